//! Apache Parquet, streamed: the reader decodes one row group at a time, only the projected columns, in record
//! batches of [`BATCH_ROWS`] rows, so memory is bounded by a row group's projected columns, not the file.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Number, Value};

use super::{RowIter, SourceRow};
use crate::error::{DataError, Result};

/// Rows per decoded record batch.
pub const BATCH_ROWS: usize = 1024;

/// Rows of a Parquet file, reading only `columns` (all when `None`); a column the file lacks is an error that
/// lists the file's columns.
pub fn rows(path: &Path, columns: Option<&[String]>) -> Result<RowIter> {
    let file: Arc<str> = Arc::from(path.display().to_string());
    let perr = |e: &dyn std::fmt::Display| DataError::Parquet { file: file.to_string(), msg: e.to_string() };
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| perr(&e))?;
    let builder = match columns {
        Some(cols) => {
            let schema = builder.schema().clone();
            if let Some(missing) = cols.iter().find(|c| schema.field_with_name(c).is_err()) {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(DataError::Parquet { file: file.to_string(), msg: format!("no column `{missing}` (the file's columns: {})", have.join(", ")) });
            }
            let idx: Vec<usize> =
                schema.fields().iter().enumerate().filter(|(_, f)| cols.contains(f.name())).map(|(i, _)| i).collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), idx);
            builder.with_projection(mask)
        }
        None => builder,
    };
    let reader = builder.with_batch_size(BATCH_ROWS).build().map_err(|e| perr(&e))?;
    let mut next_row = 1usize;
    let mut pending: std::vec::IntoIter<Result<SourceRow>> = Vec::new().into_iter();
    let mut reader = Some(reader);
    Ok(Box::new(std::iter::from_fn(move || loop {
        if let Some(r) = pending.next() {
            return Some(r);
        }
        let batch = reader.as_mut()?.next()?;
        let rows = match batch {
            Ok(b) => batch_rows(&file, &b, next_row),
            Err(e) => {
                reader = None;
                vec![Err(DataError::Parquet { file: file.to_string(), msg: e.to_string() })]
            }
        };
        next_row += rows.len();
        pending = rows.into_iter();
    })))
}

fn batch_rows(file: &Arc<str>, batch: &RecordBatch, first_row: usize) -> Vec<Result<SourceRow>> {
    let schema = batch.schema();
    let mut out: Vec<Result<SourceRow>> = (0..batch.num_rows())
        .map(|i| Ok(SourceRow { file: file.clone(), row: first_row + i, fields: Map::new() }))
        .collect();
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        for (i, slot) in out.iter_mut().enumerate() {
            let Ok(row) = slot else { continue };
            match cell(col.as_ref(), i) {
                Ok(v) => {
                    row.fields.insert(field.name().clone(), v);
                }
                Err(msg) => *slot = Err(DataError::row(file, first_row + i, field.name(), msg)),
            }
        }
    }
    out
}

fn num<T: Into<Number>>(x: T) -> Value {
    Value::Number(x.into())
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

/// One cell as JSON. Strings, integers, floats, booleans, lists and structs are supported.
pub fn cell(a: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => num(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => num(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => num(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => num(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => num(a.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => num(a.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => num(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => num(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float16 => float(a.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Binary => Value::String(String::from_utf8_lossy(a.as_binary::<i32>().value(i)).into_owned()),
        DataType::LargeBinary => Value::String(String::from_utf8_lossy(a.as_binary::<i64>().value(i)).into_owned()),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut m = Map::new();
            for (f, c) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), cell(c.as_ref(), i)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported Parquet/Arrow type {other}")),
    })
}

fn list(a: &dyn Array) -> std::result::Result<Value, String> {
    (0..a.len()).map(|j| cell(a, j)).collect::<std::result::Result<Vec<_>, _>>().map(Value::Array)
}
