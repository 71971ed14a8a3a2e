"""Evaluation: Dice tables with nnU-Net conventions, reports and figures."""
