//! JSON event stream.
