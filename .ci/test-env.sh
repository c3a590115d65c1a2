# Sourced (from the clone's root) by .ci/install-deps, .ci/test and .ci/typecheck: where
# the test suite's own virtual environment lives. It is not .venv, which README's main
# command fills with a regular install of tether alone; the two share no interpreter and
# no site-packages, so either command can run first, or again, without undoing the other.
TEST_VENV=.venv-test
TEST_PY="$PWD/$TEST_VENV/bin/python"
