"""(being written: the gridftp transfers)"""
from .base import Scheme


class GridFtpScheme(Scheme):
    pass
