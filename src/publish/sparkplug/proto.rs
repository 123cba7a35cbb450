//! The Sparkplug B payload schema (`sparkplug_b.proto`, Eclipse Sparkplug 3.0, proto2), the
//! parts an edge node of ours sends and reads: `Payload`, `Metric`, `PropertySet`,
//! `PropertyValue`. Hand-written `prost` structs with the schema's field numbers, so that no
//! `protoc` is needed to build; DataSets, Templates and extensions are left out (we never send
//! them, and a command carrying one is refused as an unknown value).

/// `Payload` (fields 1–4; `body` (5) unused).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
}

/// `Payload.Metric` (metadata (8) unused).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// `Payload.Metric.value` (DataSet, Template and extension values left out).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// `Payload.PropertySet`: parallel lists of keys and values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

/// `Payload.PropertyValue` (nested property sets and extensions left out).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyKind", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<PropertyKind>,
}

/// `Payload.PropertyValue.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyKind {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
}

/// The Sparkplug data types we use (`Payload.DataType` in the schema's comment).
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const TEXT: u32 = 14;

    /// The schema's name of a data type, for `check` and logs.
    pub fn name(t: u32) -> &'static str {
        match t {
            INT8 => "Int8",
            INT16 => "Int16",
            INT32 => "Int32",
            INT64 => "Int64",
            UINT8 => "UInt8",
            UINT16 => "UInt16",
            UINT32 => "UInt32",
            UINT64 => "UInt64",
            FLOAT => "Float",
            DOUBLE => "Double",
            BOOLEAN => "Boolean",
            STRING => "String",
            TEXT => "Text",
            _ => "Unknown",
        }
    }
}

impl PropertySet {
    /// Appends a property.
    pub fn push(&mut self, key: &str, r#type: u32, value: PropertyKind) {
        self.keys.push(key.to_owned());
        self.values.push(PropertyValue {
            r#type: Some(r#type),
            is_null: None,
            value: Some(value),
        });
    }
}
