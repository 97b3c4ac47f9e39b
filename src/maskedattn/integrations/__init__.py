"""Bridges to other libraries' extension points (imported on demand, never by the core)."""
