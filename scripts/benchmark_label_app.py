"""Prompt latency of a running I-MedSAM MONAI Label server, with and without the encoder cache.

Start a server first, e.g.

    monailabel start_server --app apps/imedsam_label --studies DIR --host 127.0.0.1 --port 8000 \
        --conf encoder vit_b --conf image_size 384

then ``python scripts/benchmark_label_app.py --server http://127.0.0.1:8000``. For each 2D picture in the
datastore (up to ``--images``), the first prompt runs the encoder and the second, with another box, finds
the encoding cached; the script prints the medians of the server's own timings and of the round trip.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import httpx
from PIL import Image


def prompt(client: httpx.Client, image_id: str, box: list[float]) -> tuple[dict, float]:
    start = time.perf_counter()
    response = client.post(f"/infer/imedsam?image={image_id}&output=json", data={"params": json.dumps({"box": box})})
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return response.json(), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--images", type=int, default=8, help="how many datastore pictures to prompt")
    args = parser.parse_args()

    client = httpx.Client(base_url=args.server, timeout=600)
    info = client.get("/info/").json()
    ids = sorted(client.get("/datastore/?output=all").json()["objects"])
    pictures = []
    for image_id in ids:
        data = client.get(f"/datastore/image?image={image_id}").content
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except OSError:
            continue  # volumes are skipped: the figure is about pictures
        pictures.append((image_id, width, height))
        if len(pictures) == args.images:
            break
    if len(pictures) < 2:
        raise SystemExit("need at least 2 pictures (PNG/JPG) in the datastore")

    # one prompt to load the model, on an image that is not measured
    warm_id, width, height = pictures[0]
    prompt(client, warm_id, [0.1 * width, 0.1 * height, 0.9 * width, 0.9 * height])
    cold, warm = {"infer": [], "encoder": [], "round_trip": []}, {"infer": [], "encoder": [], "round_trip": []}
    for image_id, width, height in pictures[1:]:
        first, first_s = prompt(client, image_id, [0.2 * width, 0.2 * height, 0.7 * width, 0.8 * height])
        second, second_s = prompt(client, image_id, [0.3 * width, 0.25 * height, 0.9 * width, 0.9 * height])
        if first["encoder_cached"] or not second["encoder_cached"]:
            raise SystemExit(f"{image_id}: expected the first prompt to run the encoder and the second to find it cached")
        for figures, answer, seconds in ((cold, first, first_s), (warm, second, second_s)):
            figures["infer"].append(answer["latencies"]["infer"])
            figures["encoder"].append(answer["encoder_s"])
            figures["round_trip"].append(seconds)

    model = info["models"]["imedsam"]
    print(f"server {args.server}: model {model['description']!r}; {len(pictures) - 1} pictures measured")
    print(f"{'':28s} {'server infer s':>15s} {'encoder s':>10s} {'round trip s':>13s}")
    for name, figures in (("first prompt (encoder runs)", cold), ("re-prompt (encoder cached)", warm)):
        print(
            f"{name:28s} {statistics.median(figures['infer']):15.3f} {statistics.median(figures['encoder']):10.3f} "
            f"{statistics.median(figures['round_trip']):13.3f}"
        )


if __name__ == "__main__":
    main()
