"""End-to-end latency: last instance sent -> SR and SEG stored in Orthanc, split by stage.

``--studies`` distinct synthetic CT studies (``--slices`` 512 x 512 slices each, with three bright
nodules the models find) are sent one after another with DCMTK ``storescu`` to a running node whose
destination is an Orthanc; each study is sent only once the previous one's results are in Orthanc,
so the figures are latencies, not queueing. One warm-up study runs first and is not counted.

Clock points: ``released`` is when storescu exits (the association is released); ``in Orthanc`` is
when REST shows both the SR and the SEG series of the study (polled every 20 ms). The stages come
from the node's own JSON events (ISO timestamps and the per-stage seconds they carry):

- receive: storescu's wall time for the series (association, every C-STORE, release);
- completion wait: ``released`` -> ``series.complete`` (grace ``completion.grace_seconds``, default 2 s);
- queue: ``series.complete`` -> start of processing (the ``series.routed`` event less routing);
- load and assembly: ``series.processed`` seconds_route + seconds_volume (headers, pixels, HU);
- preprocessing, inference, postprocessing: ``inference.done`` preprocess_s, model_s, postprocess_s;
- encoding: ``series.processed`` seconds_encode + seconds_write (SEG, SR, durable writes);
- send: ``series.processed`` -> last ``result.sent`` of the series (dispatcher wake-up + C-STORE);
- to Orthanc REST: last ``result.sent`` -> seen in Orthanc (indexing + the 20 ms poll).

    .venv/bin/python bench/latency.py [--studies 10] [--slices 300] [--model DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

_STAGES = ("receive", "completion_wait", "queue", "load_assembly", "preprocessing", "inference",
           "postprocessing", "encoding", "send", "to_orthanc_rest")


def _results_in_orthanc(orthanc: common.Server, study_uid: str) -> bool:
    found = orthanc.rest("/tools/lookup", method="POST", body=study_uid.encode())
    studies = [f["ID"] for f in found if f.get("Type") == "Study"]
    if not studies:
        return False
    modalities = {s["MainDicomTags"].get("Modality") for s in orthanc.rest(f"/studies/{studies[0]}/series")}
    return {"SR", "SEG"} <= modalities


def _by_series(events: list[dict[str, Any]], name: str, series_uid: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name and e.get("series_uid") == series_uid]


def _stages(events: list[dict[str, Any]], series_uid: str, sent: dict[str, float]) -> dict[str, float]:
    complete = common.event_time(_by_series(events, "series.complete", series_uid)[-1])
    processed_event = _by_series(events, "series.processed", series_uid)[-1]
    processed = common.event_time(processed_event)
    inference = _by_series(events, "inference.done", series_uid)[-1]
    last_sent = max(common.event_time(e) for e in _by_series(events, "result.sent", series_uid))
    p = processed_event
    start = processed - float(p["seconds_total"])
    return {
        "receive": sent["receive"],
        "completion_wait": complete - sent["released"],
        "queue": start - complete,
        "load_assembly": float(p["seconds_route"]) + float(p["seconds_volume"]),
        "preprocessing": float(inference["preprocess_s"]),
        "inference": float(inference["model_s"]),
        "postprocessing": float(inference["postprocess_s"]),
        "encoding": float(p["seconds_encode"]) + float(p["seconds_write"]),
        "send": last_sent - processed,
        "to_orthanc_rest": sent["seen"] - last_sent,
        "total_after_release": sent["seen"] - sent["released"],
    }


def main() -> None:
    """Run the latency benchmark, print the table, write bench/results/latency.json."""
    parser = common.parser(__doc__)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    netns = common.enter_private_netns()
    work: Path = args.work
    info = common.machine()
    folders = [common.synthetic_ct(args.slices, work / "data" / f"latency-{args.slices}-{i}",
                                   tag=f"latency-{i}")[0].parent for i in range(args.studies + 1)]
    model, model_what = common.model_dir(args.model, work)
    run_dir = work / f"latency-{int(time.time())}"
    orthanc = common.start_orthanc(run_dir / "orthanc")
    timings: list[dict[str, float]] = []
    loads: list[float] = []
    try:
        node = common.start_node(run_dir / "node", model,
                                 destinations=[f"ORTHANC@{common.LOCALHOST}:{orthanc.port}"])
        with common.servers(node):
            for i, folder in enumerate(folders):
                import pydicom  # noqa: PLC0415 - only the first file's header is read

                header = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
                receive = common.storescu(node, folder)
                released = time.time()
                common.wait_until(lambda h=header: _results_in_orthanc(orthanc, str(h.StudyInstanceUID)),
                                  600, f"SR and SEG of study {i} in Orthanc")
                seen = time.time()
                loads.append(__import__("os").getloadavg()[0])
                if i == 0:
                    print(f"warm-up: {seen - released:.2f} s after release", flush=True)
                    continue
                common.wait_until(lambda h=header: bool(_by_series(
                    common.node_events(node), "result.sent", str(h.SeriesInstanceUID))), 30, "result.sent")
                stages = _stages(common.node_events(node), str(header.SeriesInstanceUID),
                                 {"receive": receive, "released": released, "seen": seen})
                timings.append(stages)
                print(f"study {i}: {stages['total_after_release']:.2f} s after release "
                      f"(inference {stages['inference']:.2f} s)", flush=True)
    finally:
        orthanc.stop()
    rows = []
    summary: dict[str, Any] = {}
    for stage in (*_STAGES, "total_after_release"):
        values = [t[stage] for t in timings]
        summary[stage] = {"p50": common.percentile(values, 50), "p95": common.percentile(values, 95)}
        rows.append([stage, summary[stage]["p50"], summary[stage]["p95"]])
    outside = [t["load_assembly"] + t["preprocessing"] + t["postprocessing"] + t["encoding"] + t["send"]
               for t in timings]
    summary["all_but_inference_and_waits"] = {"p50": common.percentile(outside, 50),
                                              "p95": common.percentile(outside, 95)}
    rows.append(["load+pre+post+encode+send", summary["all_but_inference_and_waits"]["p50"],
                 summary["all_but_inference_and_waits"]["p95"]])
    print(f"\n{len(timings)} studies of {args.slices} slices 512x512, model: {model_what}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    common.print_table(["stage", "p50 s", "p95 s"], rows)
    common.write_json("latency", {
        "what": "seconds per stage, last instance sent (association released) -> SR+SEG in Orthanc",
        "studies": len(timings), "slices": args.slices, "model": model_what, "private_netns": netns,
        "machine": info, "load_average_during": loads, "summary": summary, "per_study": timings,
    })


if __name__ == "__main__":
    main()
