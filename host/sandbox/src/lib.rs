//! keel-sandbox
