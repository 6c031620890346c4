//! Queries on the key tables.
