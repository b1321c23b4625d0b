"""The ``natgrad`` command line (``natgrad.cli.main:main``)."""
