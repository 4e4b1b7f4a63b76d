"""The docs point at what exists: the tour's files, names and steps, and every page's relative links."""

import re

from tests.conftest import REPO

TOUR = REPO / "docs" / "tour.md"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# The tour's steps, in the order it takes them: each is a `## ` heading of docs/tour.md.
STEPS = (
    "1. Text → tokens",
    "2. Tokens → shards",
    "3. Shards → batches",
    "4. Batches → the model",
    "5. The model → the loss",
    "6. The loss → the optimizer",
    "7. The optimizer → a checkpoint",
    "8. Evaluation",
    "9. Sampling",
    "10. SFT: a chatbot",
    "11. RL: rewards from a verifier",
    "12. Serving",
)

# The most important names the tour sends a reader to, by the file it says defines them: renaming one in the code
# fails this test until the tour follows.
NAMES = {
    "src/gpt2lab/tokenizer/bpe.py": ["get_tokenizer"],
    "src/gpt2lab/data/shards.py": ["MAGIC"],
    "src/gpt2lab/data/loader.py": ["ShardLoader"],
    "src/gpt2lab/model/config.py": ["GPTConfig"],
    "src/gpt2lab/model/gpt.py": ["GPT", "Block"],
    "src/gpt2lab/model/attention.py": ["CausalSelfAttention"],
    "src/gpt2lab/train/objective.py": ["Objective"],
    "src/gpt2lab/train/loop.py": ["forward_backward", "train"],
    "src/gpt2lab/train/optim.py": ["lr_at", "make_optimizer"],
    "src/gpt2lab/train/muon.py": ["Muon"],
    "src/gpt2lab/checkpoint/folder.py": ["save_training_checkpoint"],
    "src/gpt2lab/checkpoint/atomic.py": ["publish"],
    "src/gpt2lab/eval/hellaswag.py": ["evaluate_hellaswag"],
    "src/gpt2lab/inference/generate.py": ["generate"],
    "src/gpt2lab/inference/kv_cache.py": ["KVCache"],
    "src/gpt2lab/chat/template.py": ["render"],
    "src/gpt2lab/sft/data.py": ["pack"],
    "src/gpt2lab/rl/rollout.py": ["RolloutLoader"],
    "src/gpt2lab/rl/grpo.py": ["group_advantages"],
    "src/gpt2lab/inference/engine.py": ["Engine"],
    "src/gpt2lab/serve/app.py": ["create_app"],
}

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where `[a](b)` is code, not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def file_links(page) -> list[str]:
    """The page's links to files of the repository: no URL, no link inside the page, the #anchor dropped."""
    targets = [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:|#", t)]
    return [t.split("#")[0] for t in targets]


def test_every_relative_link_of_the_docs_resolves_to_a_file():
    assert len(file_links(TOUR)) > 40, "the tour links few files (update this test if that is intended)"
    for page in PAGES:
        for target in file_links(page):
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
            assert path.is_relative_to(REPO), f"{page.relative_to(REPO)} links to {target}, outside the repository"


def test_every_source_path_the_tour_names_exists():
    paths = set(re.findall(r"`(src/gpt2lab/[\w/-]+\.\w+)`", TOUR.read_text()))
    assert len(paths) > 30
    for path in sorted(paths):
        assert (REPO / path).is_file(), f"docs/tour.md names {path}, which does not exist"


def test_every_source_file_the_tour_names_is_linked():
    """A file named in the tour is a link a reader can follow, not only a path to copy."""
    text = TOUR.read_text()
    for path in sorted(set(re.findall(r"`(src/gpt2lab/[\w/-]+\.\w+)`", text))):
        assert f"[`{path}`](../{path})" in text, f"docs/tour.md names {path} without linking it"


def test_the_code_names_the_tour_gives_are_defined_where_it_says():
    tour = TOUR.read_text()
    for path, names in NAMES.items():
        assert f"(../{path})" in tour, f"docs/tour.md no longer links {path}: update NAMES"
        source = (REPO / path).read_text()
        for name in names:
            assert re.search(rf"`{name}[`(.]", tour), f"docs/tour.md no longer names {name}: update NAMES"
            defined = rf"^\s*(?:def|class) {name}\b|^{name}\s*(?::[^=\n]+)?="
            assert re.search(defined, source, re.M), f"docs/tour.md says {path} defines {name}; it does not"


def test_the_tour_takes_every_step_in_order():
    headings = re.findall(r"^## (.+)$", prose(TOUR.read_text()), re.M)
    assert [h for h in headings if h in STEPS] == list(STEPS), f"the tour's steps are {headings}"
    assert headings[-1] == "Where to go next"


def test_the_readme_links_the_tour():
    assert "(docs/tour.md)" in (REPO / "README.md").read_text()
