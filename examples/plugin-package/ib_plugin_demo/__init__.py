"""ib-plugin-demo: an example third-party ibcore plugin (a loss and a sampler).

Nothing is imported here: ibcore imports ``ib_plugin_demo.losses`` or ``ib_plugin_demo.samplers``
through their entry points the first time one of their components is needed.
"""

__version__ = "0.1.0"
