//! Listener inventory (being written).
