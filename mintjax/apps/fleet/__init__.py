"""A serving fleet on Ray Serve: replicas of `Engine` sharing one registry.

  replica.py     FleetReplica: one Engine + EngineService over a registry
                 URL (PostgreSQL catalog, object-store weights), no Ray
  deployment.py  the Ray Serve deployment: model multiplexing with the
                 adapter ref as the multiplexed model id, so requests for an
                 adapter reach replicas that hold it (ray imported lazily)

See docs/FLEET.md.
"""
