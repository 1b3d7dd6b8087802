"""xz for the device scripts, by Python's lzma (no xz binary needed there): compress exports for the trip back, or
unpack carried ones.  python3 benchmarks/device/xz.py c|d SRC DST"""

import lzma
import shutil
import sys

mode, src, dst = sys.argv[1:4]
if mode == "c":  # preset 3: ~72 % of a bf16 export in seconds (the default 6 gains ~1 % for several times the time)
    with open(src, "rb") as fin, lzma.open(dst, "wb", preset=3) as fout:
        shutil.copyfileobj(fin, fout)
elif mode == "d":
    with lzma.open(src) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
else:
    sys.exit("usage: xz.py c|d SRC DST")
