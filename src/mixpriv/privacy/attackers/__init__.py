"""Re-identification attackers of the server's view, and the suite that reports the worst of them.

- :mod:`~mixpriv.privacy.attackers.estimates`: attackers that estimate the patient's scan from one
  mixture or a whole request (mean, population-corrected, rank-1 least squares), retrieved by MS-SSIM;
- :mod:`~mixpriv.privacy.attackers.learned`: a contrastively trained 3D embedding, retrieved by cosine;
- :mod:`~mixpriv.privacy.attackers.linking`: regrouping mixtures sent shuffled, by clustering;
- :mod:`~mixpriv.privacy.attackers.traffic`: attackers of the whole traffic (correlation retrieval,
  and recovery of the key's recurring references from it);
- :mod:`~mixpriv.privacy.attackers.suite`: all of them on each mixing setting; the worst case leads;
- :mod:`~mixpriv.privacy.attackers.compared`: those that apply on the compared systems' views (Privacy-Net,
  Deformation-Proxy), next to the raw scans.
"""

from mixpriv.privacy.attackers.estimates import VOLUME_ATTACKERS, Population
from mixpriv.privacy.attackers.learned import LearnedAttackerOptions
from mixpriv.privacy.attackers.linking import LinkedRequests, link_by_clustering
from mixpriv.privacy.attackers.suite import (
    ATTACKERS,
    REQUEST_DESIGNS,
    AttackerAudit,
    AttackerOptions,
    SettingAttacks,
    audit_attackers,
)
from mixpriv.privacy.attackers.traffic import (
    TRAFFIC_ATTACKERS,
    attack_traffic,
    deflate_references,
)

__all__ = ["ATTACKERS", "REQUEST_DESIGNS", "TRAFFIC_ATTACKERS", "VOLUME_ATTACKERS", "AttackerAudit",
           "AttackerOptions", "LearnedAttackerOptions", "LinkedRequests", "Population", "SettingAttacks",
           "attack_traffic", "audit_attackers", "deflate_references", "link_by_clustering"]
