"""One reference-API strength sweep, run unchanged by either implementation's interpreter.

    python evaluation_driver.py JOB.json RESULT.json

JOB: ``model_dir`` (a saved model and tokenizer), ``vector_file`` (``torch.save`` of
``{"vector", "layer", "behavior"}``), ``prompts``, ``strengths``, ``threads`` and optionally
``max_new_tokens``. The sweep has no option for the length of a response: both packages take the
default of their generation function (150 new tokens), so the driver lowers that default when
asked (the only patch, the same in both). It calls
``rotalabs_steer.evaluation.strength_sweep`` with ``is_refusal`` as the behaviour test, records
every response it classifies, and writes the rows, the responses per strength, the wall time of
the sweep, and which package ran. The script only uses names both packages export, so the
same file measures both: what a user's script would see after switching.
"""

from __future__ import annotations

import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    import torch

    torch.set_num_threads(int(job["threads"]))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rotalabs_steer
    from rotalabs_steer import SteeringVector
    from rotalabs_steer.evaluation import is_refusal, strength_sweep

    if "max_new_tokens" in job:
        import rotalabs_steer.evaluation.metrics as metrics

        # The reference generates with generate_response, this package with generate_responses;
        # max_new_tokens is the first default of either.
        for name in ("generate_response", "generate_responses"):
            function = getattr(metrics, name, None)
            if function is not None:
                function.__defaults__ = (int(job["max_new_tokens"]),) + function.__defaults__[1:]
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    saved = torch.load(job["vector_file"])
    vector = SteeringVector(saved["behavior"], saved["layer"], saved["vector"], "bench")

    responses: list[str] = []

    def refusing(response: str) -> bool:
        responses.append(response)
        return is_refusal(response)

    start = time.perf_counter()
    rows = strength_sweep(model, tokenizer, vector, job["prompts"], refusing, job["strengths"],
                          show_progress=False)
    seconds = time.perf_counter() - start
    n = len(job["prompts"])
    result = {"package": rotalabs_steer.__file__, "version": getattr(rotalabs_steer, "__version__", None),
              "rows": rows, "seconds": seconds,
              "responses": [responses[i * n:(i + 1) * n] for i in range(len(job["strengths"]))]}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
