"""GELU on the CPU: the native kernel vs torch's. Same as `maskedattn bench gelu`."""

import sys

from maskedattn.bench.gelu import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
