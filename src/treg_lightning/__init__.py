"""treg-lightning: preference optimization (DPO, IPO, SimPO) with T-REG token-level reward
regularization, as Lightning modules."""

__version__ = "0.1.0"
