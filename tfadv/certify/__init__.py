"""Certified robustness: guarantees instead of attacks.

- `tfadv.certify.smoothing`: randomized smoothing (Cohen, Rosenfeld, Kolter 2019): a certified
  L2 radius for the Gaussian-smoothed classifier, by Monte Carlo with a Clopper-Pearson bound.
- `tfadv.certify.ibp`: interval bound propagation (Gowal et al. 2018): sound bounds on a
  network's logits over an L-inf box, and the verified accuracy they give.
- `tfadv.certify.patch`: the IBP certificate against m x m patches at every location (Chiang et
  al. 2020; `bin/certify --method=patch`).
- `tfadv.certify.derandomized`: de-randomized column smoothing against patches (Levine & Feizi
  2020): a deterministic vote certificate.
"""

from tfadv.certify import ibp, smoothing  # noqa: F401
