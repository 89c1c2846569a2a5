import sys

print("pf-demo", *sys.argv[1:])
