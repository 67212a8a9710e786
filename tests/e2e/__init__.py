"""A package, so that the chain of conftest.py (scope "package") is stopped when the last
end-to-end test is done: pytest scopes a "package" fixture to the session in a folder without
an __init__.py, and the chain's operator would then keep injecting pods in later tests."""
