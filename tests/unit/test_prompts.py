from __future__ import annotations

import pytest

from core.prompts import DOMAINS, load_prompts, split


def test_three_real_domains_with_stable_ids():
    assert set(DOMAINS) >= {"code", "prose", "docs"}
    for domain in DOMAINS:
        prompts = load_prompts(domain)
        assert len(prompts) >= 100, domain
        assert all(p.domain == domain for p in prompts)
        assert len({p.prompt_id for p in prompts}) == len(prompts)
    assert load_prompts("code")[0].source == "HumanEval/HumanEval/0"
    assert "def has_close_elements" in load_prompts("code")[0].text


def test_unknown_domain_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: code, prose, docs"):
        load_prompts("poetry")


def test_split_is_deterministic_and_disjoint():
    prompts = load_prompts("prose")
    train, held = split(prompts)
    assert split(prompts) == (train, held)
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in held}
    assert 0.1 < len(held) / len(prompts) < 0.35
