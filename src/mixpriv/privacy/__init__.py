"""Privacy audit: what an attacker can recover from mixed images.

Blind source separation (a 3D noise-conditional score network and BASIS Langevin separation), 3D MS-SSIM,
patient re-identification by retrieval, and the test-retest reliability (ICC) of private predictions.
"""
