"""(being written: the globus transfers)"""
from .base import Scheme


class GlobusScheme(Scheme):
    pass
