"""(being written: the ssh transfers)"""
from .base import Scheme


class ScpScheme(Scheme):
    pass


class SftpScheme(Scheme):
    pass
