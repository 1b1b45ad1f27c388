"""uedist: unlearnable examples at ImageNet scale — protect (EM/REM/SEM), purify (D-VAE, JCDP, ISS), measure."""

__version__ = "0.1.0"
