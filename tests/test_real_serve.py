"""`cre serve` on a real model: the official openai client gets llama.cpp's answer.

The router is fitted on a plain-text log (the small log's prompts), which clusters but runs
no model, over a one-rung ladder of gemma-3-270m, so the only model work is the answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crecli.cli import app
from crecli.config import ModelSpec
from support.logs import small_log_prompts
from support.serving import serving

pytestmark = pytest.mark.real


@pytest.fixture
def gemma_router(gemma: ModelSpec, tmp_path: Path) -> tuple[Path, Path]:
    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["gemma-3-270m"]\n')
    log = tmp_path / "prompts.txt"
    log.write_text("\n".join(small_log_prompts()) + "\n")
    router = tmp_path / "gemma.cre"
    result = CliRunner().invoke(app, ["fit", str(log), "-o", str(router), "--models", str(toml), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcomes_run"] == 0  # a text log runs no model
    return router, toml


def test_openai_client_gets_a_real_answer_through_cre_serve(gemma_router: tuple[Path, Path]) -> None:
    openai = pytest.importorskip("openai")
    from crecli.escalate import Cascade

    router, toml = gemma_router
    with Cascade.from_file(router, toml) as cascade, serving(cascade) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="cre", messages=[{"role": "user", "content": "What is the capital of France?"}]
        )
        assert "paris" in reply.choices[0].message.content.lower()
        assert reply.model == "gemma-3-270m" and reply.usage.completion_tokens > 0
        assert reply.model_extra["cre"]["model"] == "gemma-3-270m"
        alone = client.completions.create(model="gemma-3-270m", prompt="What is the capital of France?", max_tokens=8)
        assert "paris" in alone.choices[0].text.lower()
