"""Pack or unpack a file as byte-shuffled xz (standard library only).

Used to move large float16 weight files to machines where transfers are size-limited: the
high and low bytes of 16-bit values are stored apart, which makes them compress better.

    python3 tools/pack.py pack   FILE FILE.bsxz
    python3 tools/pack.py unpack FILE.bsxz FILE
"""

import lzma
import sys


def pack(src, dst):
    raw = open(src, "rb").read()
    header = len(raw).to_bytes(8, "little")
    with open(dst, "wb") as out:
        out.write(lzma.compress(header + raw[0::2] + raw[1::2], preset=1))


def unpack(src, dst):
    data = lzma.decompress(open(src, "rb").read())
    size = int.from_bytes(data[:8], "little")
    body = data[8:]
    half = (size + 1) // 2
    raw = bytearray(size)
    raw[0::2] = body[:half]
    raw[1::2] = body[half:]
    with open(dst, "wb") as out:
        out.write(raw)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(sys.argv[2], sys.argv[3])
