"""Certified robustness: guarantees instead of attacks.

- `tfadv.certify.smoothing`: randomized smoothing (Cohen, Rosenfeld, Kolter 2019): a certified
  L2 radius for the Gaussian-smoothed classifier, by Monte Carlo with a Clopper-Pearson bound.
- `tfadv.certify.ibp`: interval bound propagation (Gowal et al. 2018): sound bounds on a
  network's logits over an L-inf box, and the verified accuracy they give.
"""

from tfadv.certify import ibp, smoothing  # noqa: F401
