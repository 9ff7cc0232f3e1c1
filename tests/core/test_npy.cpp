// Tests of sma/io/npy.hpp.
#include <catch2/catch.hpp>
#include <sma/io/npy.hpp>
#include <sma/testing/temp_dir.hpp>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

using namespace sma;
using namespace sma::io;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

// A .npy file from its parts, unchecked: version bytes, header text (sent as is) and data.
std::vector<std::uint8_t> npy_raw(int major, int minor, const std::string& header, const std::vector<std::uint8_t>& data,
                                  std::int64_t declared_len = -1) {
  std::vector<std::uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<std::uint8_t>(major),
                                   static_cast<std::uint8_t>(minor)};
  const auto n = static_cast<std::uint32_t>(declared_len >= 0 ? declared_len : static_cast<std::int64_t>(header.size()));
  out.push_back(static_cast<std::uint8_t>(n));
  out.push_back(static_cast<std::uint8_t>(n >> 8));
  if (major >= 2) {
    out.push_back(static_cast<std::uint8_t>(n >> 16));
    out.push_back(static_cast<std::uint8_t>(n >> 24));
  }
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string dict(const std::string& descr, const std::string& shape, const std::string& fortran = "False") {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }\n";
}

void expect_bad_npy(const std::vector<std::uint8_t>& bytes, const std::string& fragment) {
  INFO("expected an IoError containing: " << fragment);
  CHECK_THROWS_AS(parse_npy(bytes, "bad.npy"), IoError);
  CHECK_THROWS_WITH(parse_npy(bytes, "bad.npy"), Contains(fragment) && Contains("bad.npy"));
}

void expect_bad_header(const std::string& header, std::size_t data_size, const std::string& fragment) {
  INFO("header: " << header);
  expect_bad_npy(npy_raw(1, 0, header, std::vector<std::uint8_t>(data_size, 0)), fragment);
}

std::vector<std::uint8_t> hex_bytes(const std::string& hex) {
  std::vector<std::uint8_t> out(hex.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

// Written by NumPy 2.5.2 from m = [(i % 7) * 0.5 - 1.25 for i < 12] as (3, 4) float64: np.save(np.asfortranarray(m)),
// np.lib.format.write_array(m, version=(2, 0)); and np.save of [i % 3 == 0 for i < 9] (bool).
// 224 bytes
const char* const kNumpyFortranHex =
    "934e554d5059010076007b276465736372273a20273c6638272c2027666f727472616e5f6f72646572273a20547275652c20277368617065"
    "273a2028332c2034292c207d2020202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a000000000000f4bf000000000000e83f000000000000e8bf000000000000e8bf000000000000f43f"
    "000000000000d0bf000000000000d0bf000000000000fc3f000000000000d03f000000000000d03f000000000000f4bf000000000000e83f";
// 224 bytes
const char* const kNumpyV2Hex =
    "934e554d50590200740000007b276465736372273a20273c6638272c2027666f727472616e5f6f72646572273a2046616c73652c20277368"
    "617065273a2028332c2034292c207d2020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a000000000000f4bf000000000000e8bf000000000000d0bf000000000000d03f000000000000e83f"
    "000000000000f43f000000000000fc3f000000000000f4bf000000000000e8bf000000000000d0bf000000000000d03f000000000000e83f";
// 137 bytes
const char* const kNumpyBoolHex =
    "934e554d5059010076007b276465736372273a20277c6231272c2027666f727472616e5f6f72646572273a2046616c73652c202773686170"
    "65273a2028392c292c207d202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020200a010000010000010000";

}  // namespace

TEST_CASE("npy round trip for every dtype, in NumPy's exact 1.0 layout", "[io][npy]") {
  testing::TempDir dir("sma_npy_test");
  Tensor2<double> f64(2, 3);
  f64.setValues({{1.0, -2.5, 1e-300}, {std::numeric_limits<double>::infinity(), 0.1, -0.0}});
  const std::string p64 = dir.file("f64.npy");
  save_npy(p64, f64);
  CHECK_FALSE(fs::exists(temp_path_for(p64)));
  const auto bytes = read_file_bytes(p64);
  const std::string expected_dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }";
  REQUIRE(bytes.size() == 128 + 48);  // header padded so the data start at byte 128 (a multiple of 64)
  CHECK(bytes[6] == 1);
  CHECK(bytes[7] == 0);
  CHECK(bytes[8] + 256 * bytes[9] == 118);
  const std::string header(bytes.begin() + 10, bytes.begin() + 128);
  CHECK(header.substr(0, expected_dict.size()) == expected_dict);
  CHECK(header.back() == '\n');
  CHECK(header.find_first_not_of(' ', expected_dict.size()) == header.size() - 1);
  const auto r64 = load_npy<double, 2>(p64);
  CHECK(std::equal(r64.data(), r64.data() + 6, f64.data(), [](double a, double b) {
    return std::memcmp(&a, &b, sizeof a) == 0;  // bit-exact, -0.0 included
  }));

  Tensor3<float> f32(2, 1, 3);
  for (Index i = 0; i < f32.size(); ++i) f32.data()[i] = 0.5f * static_cast<float>(i) - 1.f;
  save_npy(dir.file("f32.npy"), f32);
  CHECK(read_npy(dir.file("f32.npy")).dtype == DType::F32);
  const auto r32 = load_npy<float, 3>(dir.file("f32.npy"));
  CHECK(std::equal(r32.data(), r32.data() + r32.size(), f32.data()));
  const auto r32d = load_npy<double, 3>(dir.file("f32.npy"));
  CHECK(r32d(1, 0, 2) == 1.5);

  save_npy(dir.file("f16.npy"), f32, DType::F16);
  CHECK(read_npy(dir.file("f16.npy")).dtype == DType::F16);
  const auto r16 = load_npy<float, 3>(dir.file("f16.npy"));
  CHECK(std::equal(r16.data(), r16.data() + r16.size(), f32.data()));  // values are exact in binary16

  Tensor1<std::int64_t> i64(3);
  i64.setValues({std::numeric_limits<std::int64_t>::min(), 0, 42});
  save_npy(dir.file("i64.npy"), i64);
  const auto ri64 = load_npy<std::int64_t, 1>(dir.file("i64.npy"));
  CHECK(ri64(0) == std::numeric_limits<std::int64_t>::min());
  CHECK(ri64(2) == 42);
  const auto hdr = read_file_bytes(dir.file("i64.npy"));
  const std::string i64_dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }";
  CHECK(std::string(hdr.begin() + 10, hdr.begin() + 10 + static_cast<std::ptrdiff_t>(i64_dict.size())) == i64_dict);

  Tensor2<std::int32_t> i32(1, 2);
  i32.setValues({{-7, std::numeric_limits<std::int32_t>::max()}});
  save_npy(dir.file("i32.npy"), i32);
  CHECK(load_npy<std::int32_t, 2>(dir.file("i32.npy"))(0, 1) == std::numeric_limits<std::int32_t>::max());
  CHECK(load_npy<std::int64_t, 2>(dir.file("i32.npy"))(0, 0) == -7);

  Tensor1<std::uint8_t> u8(4);
  u8.setValues({0, 1, 128, 255});
  save_npy(dir.file("u8.npy"), u8);
  const auto hu8 = read_file_bytes(dir.file("u8.npy"));
  CHECK(std::string(hu8.begin() + 10, hu8.begin() + 22) == "{'descr': '|");
  CHECK(load_npy<std::uint8_t, 1>(dir.file("u8.npy"))(3) == 255);

  Tensor1<bool> b(2);
  b.setValues({false, true});
  save_npy(dir.file("b.npy"), b);
  CHECK(read_npy(dir.file("b.npy")).dtype == DType::BOOL);
  CHECK(load_npy<bool, 1>(dir.file("b.npy"))(1));

  Tensor<double, 0> s;
  s() = -4.25;
  save_npy(dir.file("s.npy"), s);
  const auto hs = read_file_bytes(dir.file("s.npy"));
  const std::string scalar_dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (), }";
  CHECK(std::string(hs.begin() + 10, hs.begin() + 10 + static_cast<std::ptrdiff_t>(scalar_dict.size())) == scalar_dict);
  CHECK(load_npy<double, 0>(dir.file("s.npy"))() == -4.25);

  Tensor2<double> empty(0, 4);
  save_npy(dir.file("e.npy"), empty);
  CHECK(load_npy<double, 2>(dir.file("e.npy")).dimension(1) == 4);

  CHECK_THROWS_AS(save_npy(dir.file("bf.npy"), f32, DType::BF16), ValueError);  // NumPy has no bfloat16
  CHECK_FALSE(fs::exists(dir.file("bf.npy")));
  CHECK_THROWS_AS(save_npy(dir.file("int.npy"), f32, DType::I32), ValueError);

  CHECK_THROWS_AS((load_npy<double, 3>(p64)), ShapeError);
  CHECK_THROWS_WITH((load_npy<double, 3>(p64)), Contains("(2, 3)") && Contains("(*, *, *)") && Contains(p64));
  CHECK_THROWS_AS((load_npy<std::int64_t, 2>(p64)), KeyError);
}

TEST_CASE("npy reads format 2.0 and 3.0 headers and Fortran-order data", "[io][npy]") {
  std::vector<std::uint8_t> data(6 * 4);
  for (std::size_t i = 0; i < 6; ++i) {  // int32 0..5
    data[4 * i] = static_cast<std::uint8_t>(i);
  }
  const auto v2 = parse_npy(npy_raw(2, 0, dict("<i4", "(2, 3)"), data), "v2.npy");
  CHECK(v2.shape == std::vector<Index>{2, 3});
  CHECK(v2.values<int>() == std::vector<int>{0, 1, 2, 3, 4, 5});
  const auto v3 = parse_npy(npy_raw(3, 0, dict("<i4", "(6,)"), data), "v3.npy");
  CHECK(v3.values<double>()[5] == 5.0);
  // Fortran order: stored column by column; read back in C order.
  const auto fo = parse_npy(npy_raw(1, 0, dict("<i4", "(2, 3)", "True"), data), "f.npy");
  CHECK(fo.values<int>() == std::vector<int>{0, 2, 4, 1, 3, 5});
  const auto t = fo.tensor<int, 2>();
  CHECK(t(1, 0) == 1);
  CHECK(t(0, 2) == 4);
  std::vector<std::uint8_t> d3(24);
  for (std::size_t i = 0; i < 24; ++i) d3[i] = static_cast<std::uint8_t>(i);
  const auto f3 = parse_npy(npy_raw(1, 0, dict("|u1", "(2, 3, 4)", "True"), d3), "f3.npy").tensor<int, 3>();
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k) CHECK(f3(i, j, k) == i + 2 * j + 6 * k);
  // Key order and spacing are free in a Python dict literal; double quotes are Python strings too.
  const auto reordered = parse_npy(npy_raw(1, 0, "{\"shape\":(3,),'fortran_order':False,'descr':'|u1'}\n", {1, 2, 3}), "r");
  CHECK(reordered.values<int>() == std::vector<int>{1, 2, 3});
}

TEST_CASE("npy reader rejects every malformed layout with a precise IoError", "[io][npy][errors]") {
  const std::vector<std::uint8_t> eight(8, 0);
  expect_bad_npy({0x93, 'N', 'U'}, "shorter than the 10-byte .npy preamble");
  expect_bad_npy({'P', 'K', 3, 4, 0, 0, 0, 0, 0, 0, 0}, "not the .npy magic");
  expect_bad_npy(npy_raw(4, 0, dict("<f8", "(1,)"), eight), "unsupported .npy format version 4.0");
  expect_bad_npy(npy_raw(1, 1, dict("<f8", "(1,)"), eight), "unsupported .npy format version 1.1");
  expect_bad_npy(npy_raw(1, 0, dict("<f8", "(1,)"), eight, 5000), "header length 5000");
  expect_bad_npy({0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 0, 0, 0}, "shorter than the 12-byte .npy 2.0 preamble");
  expect_bad_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", 8, "must end with a newline");
  expect_bad_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), } \xc2\xb5\n", 8, "is not ASCII");
  expect_bad_header("['descr', '<f8']\n", 8, "expected '{'");
  expect_bad_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), } x\n", 8, "unexpected text after");
  expect_bad_header("{'descr': '<f8' 'shape': (1,)}\n", 8, "expected ',' or '}'");
  expect_bad_header("{'descr': '<f8, 'fortran_order': False}\n", 8, "expected ',' or '}'");
  expect_bad_header("{'descr: 1}\n", 8, "unterminated string");
  expect_bad_header("{descr: '<f8'}\n", 8, "expected a quoted key");
  expect_bad_header("{'descr': '<f8', 'shape': (1,), }\n", 8, "lacks the key 'fortran_order'");
  expect_bad_header("{'fortran_order': False, 'shape': (1,), }\n", 8, "lacks the key 'descr'");
  expect_bad_header("{'descr': '<f8', 'fortran_order': False, }\n", 8, "lacks the key 'shape'");
  expect_bad_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'x': 'y'}\n", 8, "unexpected key 'x'");
  expect_bad_header("{'descr': '<f8', 'descr': '<f8', 'fortran_order': False, 'shape': (1,)}\n", 8,
                    "key 'descr' appears twice");
  expect_bad_header("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,)}\n", 8,
                    "expected a string, True, False or a tuple");
  expect_bad_header("{'descr': (8,), 'fortran_order': False, 'shape': (1,)}\n", 8, "structured dtypes are not supported");
  expect_bad_header(dict(">f8", "(1,)"), 8, "big-endian descr '>f8' is not supported");
  expect_bad_header(dict("<c16", "(1,)"), 16, "unsupported descr '<c16'");
  expect_bad_header(dict("<f8", "(1,)", "'no'"), 8, "'fortran_order' must be True or False");
  expect_bad_header(dict("<f8", "(1,)", "1"), 8, "expected a string, True, False");
  expect_bad_header(dict("<f8", "'1'"), 8, "'shape' must be a tuple");
  expect_bad_header(dict("<f8", "(1)"), 8, "a 1-element tuple is written (1,)");
  expect_bad_header(dict("<f8", "(-1,)"), 8, "a shape extent is negative");
  expect_bad_header(dict("<f8", "(1.5,)"), 8, "expected ',' or ')' in a tuple");
  expect_bad_header(dict("<f8", "(99999999999999999999,)"), 8, "a shape extent is too large");
  expect_bad_header(dict("<f8", "(4294967296, 4294967296)"), 8, "more elements than a 64-bit index");
  expect_bad_header(dict("<f8", "(2305843009213693952,)"), 8, "needs more bytes than a 64-bit offset");
  expect_bad_header(dict("<f8", "(2, 3)"), 40, "has 40 bytes, but shape (2, 3) of <f8 needs 48: the file is truncated");
  expect_bad_header(dict("<f8", "(2,)"), 20, "4 trailing bytes after the data");
  // Messages carry the file byte of the problem.
  expect_bad_header(dict("<f8", "(1)"), 8, "bad.npy");
  expect_bad_header("{'descr: 1}\n", 8, "file byte ");
}

TEST_CASE("npy reader survives random corruption: IoError or a consistent array, never a crash",
          "[io][npy][errors]") {
  const std::vector<std::uint8_t> payload(2 * 3 * 8, 0x3F);
  const auto good = npy_file_bytes(DType::F64, {2, 3}, payload.data(), payload.size());
  std::uint64_t state = 0x2545F4914F6CDD1Dull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  int rejected = 0, accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    auto bytes = good;
    const int edits = 1 + static_cast<int>(next() % 3);
    for (int e = 0; e < edits; ++e) {
      const std::size_t limit = next() % 4 == 0 ? bytes.size() : std::size_t{80};
      bytes[next() % limit] = static_cast<std::uint8_t>(next() % 2 ? next() : "0123456789(),' TF"[next() % 17]);
    }
    if (next() % 8 == 0) bytes.resize(next() % bytes.size());
    try {
      const NpyArray a = parse_npy(bytes, "fuzz");
      ++accepted;
      REQUIRE(a.bytes.size() == static_cast<std::size_t>(a.numel()) * dtype_size(a.dtype));
      REQUIRE(a.values<double>().size() == static_cast<std::size_t>(a.numel()));
    } catch (const IoError&) {
      ++rejected;
    }
  }
  CHECK(rejected > 1000);
  CHECK(accepted > 0);
}

TEST_CASE("npy saves are atomic through the shared helper", "[io][npy][atomic]") {
  testing::TempDir dir("sma_npy_test");
  const std::string path = dir.file("a.npy");
  Tensor1<double> a(4), b(1000);
  a.setConstant(1.0);
  b.setConstant(2.0);
  save_npy(path, a);
  const auto before = read_file_bytes(path);
  AtomicWriteOptions opt;
  opt.fail_after_bytes = 130;
  CHECK_THROWS_AS(save_npy(path, b, opt), IoError);
  CHECK(read_file_bytes(path) == before);
  CHECK_FALSE(fs::exists(temp_path_for(path)));
  save_npy(path, b);
  CHECK(load_npy<double, 1>(path)(999) == 2.0);
  CHECK_THROWS_WITH(read_npy(dir.file("missing.npy")), Contains("missing.npy") && Contains("cannot open"));
}

TEST_CASE("npy files written by NumPy read back: Fortran order, format 2.0, bool", "[io][npy][interop]") {
  for (const char* hex : {kNumpyFortranHex, kNumpyV2Hex}) {
    const auto t = parse_npy(hex_bytes(hex), "numpy.npy").tensor<double, 2>();
    REQUIRE(t.dimension(0) == 3);
    REQUIRE(t.dimension(1) == 4);
    for (Index i = 0; i < 3; ++i)
      for (Index j = 0; j < 4; ++j) CHECK(t(i, j) == ((4 * i + j) % 7) * 0.5 - 1.25);
  }
  CHECK(hex_bytes(kNumpyV2Hex)[6] == 2);
  const auto b = parse_npy(hex_bytes(kNumpyBoolHex), "bool.npy");
  CHECK(b.dtype == DType::BOOL);
  CHECK(b.values<bool>() == std::vector<bool>{true, false, false, true, false, false, true, false, false});
}

TEST_CASE("testing::TempDir: a fresh folder per object, removed with its files", "[core][testing]") {
  fs::path kept;
  {
    testing::TempDir a("sma_tempdir_test"), b("sma_tempdir_test");
    REQUIRE(fs::is_directory(a.path()));
    CHECK(fs::is_empty(a.path()));
    CHECK(a.path() != b.path());
    CHECK(a.path().parent_path() == fs::temp_directory_path());
    CHECK(fs::path(a.file("x.npy")).parent_path() == a.path());
    Tensor2<float> t(2, 3);
    t.setZero();
    save_npy(a.file("x.npy"), t);
    REQUIRE(fs::exists(a.file("x.npy")));
    kept = a.path();
  }
  CHECK_FALSE(fs::exists(kept));
}
