#!/usr/bin/env python3
"""libvips's figures for `make bench` and `make load`, measured in the same run.

One thread (VIPS_CONCURRENCY=1, set before libvips loads), the image decoded
into memory first, as imgflow's figures are. Prints one JSON object, in ms:
  blur_<sigma>      gaussblur on the decoded pixels (median)
  grayscale         colourspace b-w on the decoded pixels (median)
  resize_down, resize_up
                    resize with the lanczos3 kernel to 320 wide, and 4x up
  job_blur_2, job_grayscale
                    a whole photo job: PNG bytes in, decode, op, PNG bytes out
Usage: scripts/vips_bench.py IMAGE.png [SIGMA ...]
Needs libvips (Debian: libvips42) and pyvips (PyPI); scripts/bench-deps.sh
installs both.
"""
import json
import os
import statistics
import sys
import time

os.environ["VIPS_CONCURRENCY"] = "1"
import pyvips  # noqa: E402

pyvips.cache_set_max(0)


def median_ms(f, runs):
    f()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        f()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def main():
    path = sys.argv[1]
    sigmas = [float(s) for s in sys.argv[2:]] or [2.0, 8.0, 50.0]
    data = open(path, "rb").read()
    image = pyvips.Image.new_from_buffer(data, "").copy_memory()
    out = {"libvips": pyvips.version(0), "libvips_version": "%d.%d.%d" % (pyvips.version(0), pyvips.version(1), pyvips.version(2))}
    for sigma in sigmas:
        runs = 3 if sigma >= 20 else 15
        out["blur_%g" % sigma] = median_ms(lambda: image.gaussblur(sigma).write_to_memory(), runs)
    out["grayscale"] = median_ms(lambda: image.colourspace("b-w").write_to_memory(), 15)
    scale = 320 / image.width
    out["resize_down"] = median_ms(lambda: image.resize(scale, kernel="lanczos3").write_to_memory(), 15)
    out["resize_up"] = median_ms(lambda: image.resize(4, kernel="lanczos3").write_to_memory(), 5)

    def job(op):
        def run():
            img = pyvips.Image.new_from_buffer(data, "")
            op(img).write_to_buffer(".png")
        return run

    out["job_grayscale"] = median_ms(job(lambda i: i.colourspace("b-w")), 9)
    out["job_blur_2"] = median_ms(job(lambda i: i.gaussblur(2.0)), 9)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
