"""The documentation pages; a package only so that its conftest.py has a unique module name."""
