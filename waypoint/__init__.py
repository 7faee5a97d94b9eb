"""The waypoint side of the dual-engine hand-off: the ``kmesh_tlv`` Envoy dynamic module (C, in
``kmesh_tlv/``), how to build it (``waypoint.module``) and the Envoy config fragments that load it
(``waypoint.envoycfg``)."""
