"""AUTOMATIC1111's reading of a PNG `parameters` text, written from its documented format (the web UI's
PNG-info tab and every tool that follows it): prompt lines, an optional line starting "Negative prompt:",
then a last line of `Key: value` pairs separated by commas, where a value may be a JSON string (A1111
quotes values holding a comma, colon or newline) and a WxH value is split into -1 and -2 entries. The
last line counts as parameters only when it holds at least three pairs.
"""

from __future__ import annotations

import json
import re

PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        size = SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out
