//! Rows in PostgreSQL's binary `COPY` format, for installing a snapshot with one
//! `COPY ... FROM STDIN (FORMAT binary)` instead of batches of `INSERT`s. Pure.
//!
//! The format (PostgreSQL documentation, "COPY", "Binary Format"): a fixed header, then per row a
//! 16-bit field count and, per field, a 32-bit byte length and the value in the type's binary send
//! form, then a 16-bit -1. Our two column types are `BIGINT` (8 bytes, big-endian) and `TEXT`
//! (its UTF-8 bytes, as the server's and the client's encoding are both UTF-8). Unlike the text
//! format, nothing in a value needs escaping, so no value can be misread as a delimiter.

use crate::schema::{Row, Value};

/// Signature, flags (no OIDs) and the length of the (empty) header extension.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The field count -1 that ends the data.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Why a row cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("a row has {0} columns, more than COPY allows")]
    TooManyColumns(usize),
    #[error("a text value of {0} bytes is longer than COPY allows")]
    TooLong(usize),
}

/// Appends one row (a tuple of the binary format) to `out`. The caller has checked the row
/// against the schema: the values' kinds must match the table's column types.
pub fn encode_row(out: &mut Vec<u8>, row: &Row) -> Result<(), EncodeError> {
    let fields = i16::try_from(row.0.len()).map_err(|_| EncodeError::TooManyColumns(row.0.len()))?;
    out.extend_from_slice(&fields.to_be_bytes());
    for v in &row.0 {
        match v {
            Value::Int(i) => {
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&i.to_be_bytes());
            }
            Value::Text(t) => {
                let len = i32::try_from(t.len()).map_err(|_| EncodeError::TooLong(t.len()))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(t.as_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_trailer_are_the_documented_bytes() {
        assert_eq!(HEADER.len(), 11 + 4 + 4);
        assert_eq!(&HEADER[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(TRAILER, (-1i16).to_be_bytes());
    }

    #[test]
    fn a_row_is_its_field_count_then_length_prefixed_values() {
        let mut out = Vec::new();
        encode_row(&mut out, &Row(vec![Value::Int(-2), Value::Text("a\tb\n\\é".into()), Value::Int(258)])).unwrap();
        let mut want = vec![0, 3];
        want.extend([0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        want.extend([0, 0, 0, 7]);
        want.extend("a\tb\n\\é".as_bytes());
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(out, want);
        // An empty string is a zero-length value, not NULL (-1).
        out.clear();
        encode_row(&mut out, &Row(vec![Value::Text(String::new())])).unwrap();
        assert_eq!(out, [0, 1, 0, 0, 0, 0]);
    }
}
