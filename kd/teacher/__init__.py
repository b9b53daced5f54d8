"""Teacher scoring: request/result types, one module per backend, and the factory (:mod:`kd.teacher.factory`)."""
