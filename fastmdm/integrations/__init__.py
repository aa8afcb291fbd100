"""fastmdm inside the peers' own APIs (each module imports its peer package only when imported).

- :mod:`fastmdm.integrations.diffusers`: ``FastMDMScheduler``, a diffusers scheduler
  (``pipe.scheduler = FastMDMScheduler.from_config(pipe.scheduler.config)``).
- :mod:`fastmdm.integrations.k_diffusion`: ``sample_ei`` and ``sample_ancestral``, sampler functions
  in k-diffusion's calling convention (no k-diffusion import needed).

Install the peers with the ``interop`` extra (see the README).
"""
