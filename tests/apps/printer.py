"""A task for the job log tests: prints to job.out/job.err in a way a test can follow.

Usage (argv): ``printer.py MODE ARG``
  gate FILE   print "first line" (and "first err" on stderr), wait until FILE exists, then
              print "second line" and end: a follower must see the first while it runs
  bytes N     write N bytes ("x" * 99 + newline per 100) at once, then end
  escapes     print terminal escape sequences, a bell, a carriage return and invalid UTF-8
  lines N     print N numbered lines
  flood MB    write as fast as it can, MB MiB in all (a task printing gigabytes, in small)
"""
import os
import sys
import time

mode, arg = sys.argv[1], sys.argv[2]
out = sys.stdout.buffer
if mode == "gate":
    out.write(b"first line\n")
    out.flush()
    sys.stderr.write("first err\n")
    sys.stderr.flush()
    while not os.path.exists(arg):
        time.sleep(0.05)
    out.write(b"second line\n")
elif mode == "bytes":
    n = int(arg)
    line = b"x" * 99 + b"\n"
    block = line * 10_000
    while n > 0:
        out.write(block[:n])
        n -= len(block)
elif mode == "escapes":
    out.write(b"\x1b[31mred\x1b[0m \x1b]0;title\x07 bell\x07 cr\rX\n")
    out.write(b"bad utf8: \xff\xfe end\n\xc2\x9b[2J tab\there\n")
elif mode == "flood":
    block = (b"y" * 1023 + b"\n") * 64
    for _ in range(int(arg) * 16):
        out.write(block)
elif mode == "lines":
    for i in range(1, int(arg) + 1):
        out.write(b"line %d\n" % i)
out.flush()
