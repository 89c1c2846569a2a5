"""(being written: the http transfers)"""
from .base import Scheme


class HttpScheme(Scheme):
    pass
