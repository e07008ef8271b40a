//! The one place that turns activations into `expertmesh.v1.Tensor` messages and back.
//! Decoding validates everything a peer could get wrong (dtype, shape, byte length, finiteness)
//! and names the field in the error.

use expertmesh_proto::v1::{Dtype, Tensor};
use half::bf16;

use crate::error::ServiceError;

/// Element types activations may travel in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WireDType {
    /// Half the bytes; the default (the official model runs its activations in bf16).
    #[default]
    Bf16,
    F32,
}

impl WireDType {
    pub fn bytes(self) -> usize {
        match self {
            WireDType::Bf16 => 2,
            WireDType::F32 => 4,
        }
    }

    pub fn to_proto(self) -> Dtype {
        match self {
            WireDType::Bf16 => Dtype::Bf16,
            WireDType::F32 => Dtype::F32,
        }
    }

    /// `None` for `DTYPE_UNSPECIFIED`; an error for values this build does not know.
    pub fn from_proto(value: i32, field: &str) -> Result<Option<Self>, ServiceError> {
        match Dtype::try_from(value) {
            Ok(Dtype::Unspecified) => Ok(None),
            Ok(Dtype::Bf16) => Ok(Some(WireDType::Bf16)),
            Ok(Dtype::F32) => Ok(Some(WireDType::F32)),
            Err(_) => Err(ServiceError::invalid(field, format!("unknown dtype {value}"))),
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(WireDType::Bf16),
            "f32" => Ok(WireDType::F32),
            _ => Err(format!("unknown wire dtype {s:?} (expected bf16 or f32)")),
        }
    }
}

/// Encodes `rows × cols` values (row-major). bf16 rounds to nearest even.
pub fn encode(values: &[f32], rows: usize, cols: usize, dtype: WireDType) -> Tensor {
    debug_assert_eq!(values.len(), rows * cols);
    let mut data = Vec::with_capacity(values.len() * dtype.bytes());
    match dtype {
        WireDType::Bf16 => values.iter().for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        WireDType::F32 => values.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
    }
    Tensor { dtype: dtype.to_proto() as i32, shape: vec![rows as u64, cols as u64], data }
}

/// A decoded 2-D tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: WireDType,
    pub values: Vec<f32>,
}

/// Decodes a `[rows, cols]` tensor whose column count must be `cols`; `field` names it in errors.
/// Rejects a missing dtype, a shape that is not 2-D, a byte length that disagrees with the shape,
/// and non-finite values.
pub fn decode(t: Option<&Tensor>, cols: usize, field: &str) -> Result<Matrix, ServiceError> {
    let t = t.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
    let dtype = WireDType::from_proto(t.dtype, &format!("{field}.dtype"))?
        .ok_or_else(|| ServiceError::invalid(format!("{field}.dtype"), "unspecified (expected bf16 or f32)"))?;
    let [rows, c] = t.shape[..] else {
        return Err(ServiceError::invalid(format!("{field}.shape"), format!("{:?} is not [tokens, dim]", t.shape)));
    };
    if c != cols as u64 {
        return Err(ServiceError::invalid(format!("{field}.shape"), format!("dim is {c}, expected {cols}")));
    }
    let expected = rows.checked_mul(c).and_then(|n| n.checked_mul(dtype.bytes() as u64));
    if expected != Some(t.data.len() as u64) {
        return Err(ServiceError::invalid(
            format!("{field}.data"),
            format!(
                "{} bytes, but shape {:?} of {dtype:?} needs {}",
                t.data.len(),
                t.shape,
                expected.map_or("more than 2^64".to_string(), |n| n.to_string())
            ),
        ));
    }
    let values: Vec<f32> = match dtype {
        WireDType::Bf16 => t.data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        WireDType::F32 => t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(ServiceError::invalid(format!("{field}.data"), format!("element {i} is not finite")));
    }
    Ok(Matrix { rows: rows as usize, cols, dtype, values })
}

/// Rounds values as a bf16 trip over the wire would (for computing the expected result locally).
pub fn round_trip(values: &mut [f32], dtype: WireDType) {
    if dtype == WireDType::Bf16 {
        values.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn round_trips_exactly_in_f32_and_to_nearest_bf16() {
        let v = [1.0f32, -2.5, 3.0e-3, 1.0 + 1.0 / 256.0 + 1.0 / 512.0];
        let f = decode(Some(&encode(&v, 2, 2, WireDType::F32)), 2, "x").unwrap();
        assert_eq!(f.values, v);
        let b = decode(Some(&encode(&v, 2, 2, WireDType::Bf16)), 2, "x").unwrap();
        // bf16 keeps 8 significant bits: 1 + 2^-8 + 2^-9 rounds up to 1 + 2^-7.
        assert_eq!(b.values, [1.0, -2.5, bf16::from_f32(3.0e-3).to_f32(), 1.0 + 1.0 / 128.0]);
        assert_eq!(encode(&v, 2, 2, WireDType::Bf16).data.len(), 8);
    }

    fn err(t: &Tensor) -> String {
        let e = decode(Some(t), 2, "hidden").unwrap_err();
        assert_eq!(tonic::Status::from(e.clone()).code(), Code::InvalidArgument);
        e.to_string()
    }

    #[test]
    fn rejects_malformed_tensors_naming_the_field() {
        let good = encode(&[1.0, 2.0, 3.0, 4.0], 2, 2, WireDType::Bf16);
        assert!(err(&Tensor { dtype: 0, ..good.clone() }).contains("hidden.dtype"));
        assert!(err(&Tensor { dtype: 9, ..good.clone() }).contains("unknown dtype 9"));
        assert!(err(&Tensor { shape: vec![4], ..good.clone() }).contains("hidden.shape"));
        assert!(err(&Tensor { shape: vec![2, 3], ..good.clone() }).contains("dim is 3"));
        assert!(err(&Tensor { data: good.data[..7].to_vec(), ..good.clone() }).contains("hidden.data"));
        assert!(err(&Tensor { shape: vec![u64::MAX, 2], ..good.clone() }).contains("hidden.data"));
        let nan = encode(&[1.0, f32::NAN, 0.0, 0.0], 2, 2, WireDType::F32);
        assert!(err(&nan).contains("element 1 is not finite"));
        assert!(decode(None, 2, "hidden").unwrap_err().to_string().contains("hidden: missing"));
    }
}
