"""Attack presets: each is the one `PGD` engine with a few arguments fixed, registered in `ATTACKS`.

Step sizes default to eps / 4 (2/255 at 8/255), the convention of the PGD-20 protocol, so the same preset
works on MNIST (eps 0.3) and CIFAR-10.
"""
from __future__ import annotations

from typing import Any, Optional

from .engine import PGD
from .registry import ATTACKS, Natural


def _pgd(steps: int, loss: str = "ce", descent: bool = False):
    def factory(eps: float = 8 / 255, step_size: Optional[float] = None, **kw: Any) -> PGD:
        kw.setdefault("steps", steps)
        return PGD(eps=eps, step_size=step_size or eps / 4, loss=loss, descent=descent, **kw)

    return factory


@ATTACKS.register("natural", help="no attack: clean accuracy")
def natural(**_: Any) -> Natural:
    """`Natural`: the clean input; every keyword (eps, norm, ...) is ignored."""
    return Natural()


@ATTACKS.register("fgsm", help="FGSM (Goodfellow et al. 2015): one step of size eps, no random start")
def fgsm(eps: float = 8 / 255, step_size: Optional[float] = None, **kw: Any) -> PGD:
    """One PGD step of size `step_size` (default eps) from x itself; steps and random_start are fixed."""
    kw.update(steps=1, random_start=False)
    return PGD(eps=eps, step_size=step_size or eps, **kw)


@ATTACKS.register("fgsm-rs", help="FGSM with random start, step 1.25 eps (Wong et al. 2020)")
def fgsm_rs(eps: float = 8 / 255, step_size: Optional[float] = None, **kw: Any) -> PGD:
    """One PGD step (unless `steps` is given) of size `step_size` (default 1.25 eps) from a random start."""
    kw.setdefault("steps", 1)
    return PGD(eps=eps, step_size=step_size or 1.25 * eps, **kw)


ATTACKS.register("pgd", help="PGD-10 on CE, random start, step eps/4 (Madry et al. 2018)")(_pgd(10))
ATTACKS.register("pgd20", help="PGD-20 on CE, random start, step eps/4")(_pgd(20))
ATTACKS.register("pgd100", help="PGD-100 on CE, random start, step eps/4")(_pgd(100))
ATTACKS.register("cw", help="CW-inf: PGD-30 on the Carlini-Wagner margin loss")(_pgd(30, "cw"))
ATTACKS.register("inverse-pgd", help="inverse adversary: PGD-10 DEScent on CE (Dong et al. 2023)")(
    _pgd(10, descent=True)
)
