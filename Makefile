# The README's two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
DEMO_PROBLEM ?= Alice has 3 boxes with 4 apples each. She gives away 5 apples. How many apples does she have left?

.PHONY: install demo test

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

demo: install
	hogwild run "$(DEMO_PROBLEM)" --workers 2 --model default

test: install
	$(PYTHON) -m pytest -q
