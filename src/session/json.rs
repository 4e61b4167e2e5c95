//! Values serialized once, on the stack while they are small.

use std::sync::Arc;

use serde::Serialize;

use super::serde_error;
use crate::error::{Error, Kind};

pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Arc<str>, Error> {
    let mut out = JsonBuf {
        stack: [0; 64],
        len: 0,
        heap: Vec::new(),
    };
    serde_json::to_writer(&mut out, value).map_err(serde_error)?;
    // serde_json writes UTF-8.
    std::str::from_utf8(out.bytes())
        .map(Arc::from)
        .map_err(|e| Error::with(Kind::Serde, e))
}

/// Where a value is serialized before it is copied once into its `Arc`: on the stack while it
/// fits (most values are small), then in a `Vec` that takes over what was written so far.
struct JsonBuf {
    stack: [u8; 64],
    len: usize,
    heap: Vec<u8>,
}

impl JsonBuf {
    fn bytes(&self) -> &[u8] {
        if self.heap.is_empty() {
            &self.stack[..self.len]
        } else {
            &self.heap
        }
    }
}

impl std::io::Write for JsonBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.heap.is_empty() && self.len + data.len() <= self.stack.len() {
            self.stack[self.len..self.len + data.len()].copy_from_slice(data);
            self.len += data.len();
        } else {
            if self.heap.is_empty() {
                self.heap.reserve(2 * (self.len + data.len()));
                self.heap.extend_from_slice(&self.stack[..self.len]);
            }
            self.heap.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_serialize_as_serde_json_writes_them_across_the_stack_buffer_edge() {
        for len in [0, 1, 61, 62, 63, 64, 65, 127, 4096] {
            let value = "x".repeat(len);
            let ours = to_json(&value).unwrap();
            assert_eq!(&*ours, serde_json::to_string(&value).unwrap(), "{len}");
        }
        let nested = serde_json::json!({"a": vec!["b"; 40], "c": {"d": 1.5}});
        assert_eq!(&*to_json(&nested).unwrap(), nested.to_string());
    }

    #[test]
    fn a_value_that_does_not_serialize_is_a_serde_error() {
        // JSON object keys must be strings.
        let map = std::collections::BTreeMap::from([((1, 2), 3)]);
        let err = to_json(&map).unwrap_err();
        assert!(err.is_serde(), "{err}");
    }
}
