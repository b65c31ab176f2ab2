"""Prints the path of the test executable named argv[1] from `cargo ... --message-format=json`
on stdin (used by the GPU scripts to carry a prebuilt test binary)."""

import json
import sys

for line in sys.stdin:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        continue
    if (
        message.get("reason") == "compiler-artifact"
        and message.get("executable")
        and message["target"]["name"] == sys.argv[1]
    ):
        print(message["executable"])
