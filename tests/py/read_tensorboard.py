#!/usr/bin/env python3
"""Independent reader for scgpt-engine's TensorBoard event files, using TensorBoard's own loader.

Usage: read_tensorboard.py DIR [--text]

Prints JSON {tag: [[step, value], ...]} of every scalar in DIR's event files, in the order
TensorBoard keeps them (after its restart purging). Non-finite values are printed as the strings
"nan", "inf", "-inf", since JSON has no literal for them. With --text, prints the text
summaries instead: {tag: [[step, "text"], ...]}.
"""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)


def number(x):
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def main():
    args = sys.argv[1:]
    text = "--text" in args
    dirs = [a for a in args if a != "--text"]
    if len(dirs) != 1:
        sys.exit(__doc__)
    # 0 = keep everything; the default reservoir sampling would drop points of long runs.
    acc = EventAccumulator(dirs[0], size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    out = {}
    if text:
        for tag in acc.Tags()[TENSORS]:
            meta = acc.SummaryMetadata(tag)
            if meta.plugin_data.plugin_name != "text":
                continue
            out[tag] = [
                [e.step, b"".join(e.tensor_proto.string_val).decode("utf-8")]
                for e in acc.Tensors(tag)
            ]
    else:
        for tag in acc.Tags()[SCALARS]:
            out[tag] = [[e.step, number(e.value)] for e in acc.Scalars(tag)]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
