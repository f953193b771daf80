"""Protocol handlers: a request and a session in, a reply or a record plan out."""
