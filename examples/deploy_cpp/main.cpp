// hae_deploy: generation (greedy or sampled) from an hae_fx .pt2 package in C++, without Python.
//
//   hae_deploy [--temperature T] [--top-k K] [--top-p P] [--seed S] [--image FILE] model.pt2 MAX_NEW_TOKENS ID...
//
// The package (hae_fx.export) holds two AOTInductor models, "prefill" and "decode", with eviction compiled in,
// and extra/hae_fx.txt: one fact per line (batch, prompt limits, the cache tensors, where each weight is stored).
// This program loads both models, hands them the package's weights (stored once, shared by both), allocates the
// cache both programs read and update in place, runs prefill on the prompt (repeated over the package's batch),
// then the decode program once per new token, and prints each sequence's new token ids.
//
// A package that takes an image input (pixel_values, or image_features for a tower outside the package) needs
// --image FILE: the input's values as raw float32 (native byte order, row-major), of exactly the shape the
// package was exported for (the `image` line of extra/hae_fx.txt), already preprocessed as the model's image
// processor would; this program converts them to the package's image dtype.
//
// Without options it decodes greedily. Any of the options samples, with the warpers of HF's
// generate(do_sample=True) in HF's order and with HF's defaults (temperature 1, top-k 50, top-p 1; top-k 0 keeps
// every token): the logits divided by the temperature, the tokens below the k-th largest dropped, then the
// least likely tokens whose probabilities sum to at most 1 - top-p dropped (the most likely always kept). The
// draw is std::mt19937_64's, seeded once (random without --seed): the same seed gives the same tokens, though
// not the tokens torch's generator would draw.
//
// Loading a package runs the native code compiled into it: load trusted files only.

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using Constants = std::unordered_map<std::string, at::Tensor>;

struct CacheSpec {
  std::string name;
  c10::ScalarType dtype;
  double fill;
  std::vector<int64_t> shape;
};

struct ImageSpec {
  std::string name;  // pixel_values or image_features
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
};

struct Package {
  std::map<std::string, int64_t> sizes;  // batch, min_prompt_len, max_prompt_len, kept_len_max, ...
  std::optional<ImageSpec> image;
  std::vector<int64_t> eos_token_ids;
  std::vector<CacheSpec> cache;
  std::map<std::string, Constants> weights;  // per program, per constant
};

c10::ScalarType dtype_named(const std::string& name) {
  static const std::map<std::string, c10::ScalarType> dtypes = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"int64", at::kLong},
      {"int32", at::kInt},     {"int8", at::kChar},    {"uint8", at::kByte},        {"bool", at::kBool},
      {"float8_e4m3fn", at::kFloat8_e4m3fn}};
  auto found = dtypes.find(name);
  TORCH_CHECK(found != dtypes.end(), "unknown dtype in the package metadata: ", name);
  return found->second;
}

std::vector<int64_t> read_ints(std::istringstream& words, int64_t count) {
  std::vector<int64_t> values(count);
  for (auto& value : values) words >> value;
  return values;
}

std::vector<char> read_record(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name) {
  auto [data, size] = reader.getRecord(name);
  const char* begin = static_cast<const char*>(data.get());
  return std::vector<char>(begin, begin + size);
}

// Reads extra/hae_fx.txt and the weight records it names (each record is a torch.save'd storage).
Package read_package(const std::string& path) {
  caffe2::serialize::PyTorchStreamReader reader(path);
  auto text = read_record(reader, "extra/hae_fx.txt");
  std::istringstream lines(std::string(text.begin(), text.end()));
  Package package;
  std::map<std::string, at::Tensor> storages;
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string key;
    words >> key;
    if (key == "cache") {
      CacheSpec spec;
      std::string dtype;
      int64_t ndim;
      words >> spec.name >> dtype >> spec.fill >> ndim;
      spec.dtype = dtype_named(dtype);
      spec.shape = read_ints(words, ndim);
      package.cache.push_back(spec);
    } else if (key == "weight") {
      std::string program, fqn, record;
      int64_t offset, ndim;
      words >> program >> fqn >> record >> offset >> ndim;
      auto shape = read_ints(words, ndim);
      auto stride = read_ints(words, ndim);
      if (!storages.count(record)) {
        storages[record] = torch::pickle_load(read_record(reader, "data/weights/" + record)).toTensor();
      }
      package.weights[program][fqn] = storages[record].as_strided(shape, stride, offset);
    } else if (key == "image") {
      ImageSpec spec;
      std::string dtype;
      int64_t ndim;
      words >> spec.name >> dtype >> ndim;
      spec.dtype = dtype_named(dtype);
      spec.shape = read_ints(words, ndim);
      package.image = spec;
    } else if (key == "eos_token_id") {
      for (int64_t id; words >> id;) package.eos_token_ids.push_back(id);
    } else if (!key.empty()) {
      words >> package.sizes[key];
    }
  }
  TORCH_CHECK(package.sizes["format"] == 1, "package format ", package.sizes["format"], ", this runner reads 1");
  TORCH_CHECK(!package.sizes["image_input"] || package.image, path,
              " takes an image input but does not name its shape; export it again with this hae_fx");
  return package;
}

// HF's sampling warpers (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, min_tokens_to_keep 1).
struct Sampling {
  double temperature = 1.0;
  int64_t top_k = 50;
  double top_p = 1.0;

  // [batch, vocab] logits -> the scores to draw from, dropped tokens at -inf
  at::Tensor warp(const at::Tensor& logits) const {
    const double drop = -std::numeric_limits<double>::infinity();
    at::Tensor scores = logits.to(at::kFloat);
    if (temperature != 1.0) scores = scores / temperature;
    if (top_k != 0) {
      const int64_t k = std::min(top_k, scores.size(-1));
      at::Tensor kth = std::get<0>(scores.topk(k)).narrow(-1, k - 1, 1);  // the k-th largest, ties kept
      scores = scores.masked_fill(scores < kth, drop);
    }
    if (top_p < 1.0) {
      auto [ascending, order] = scores.sort(-1, false);
      at::Tensor remove = ascending.softmax(-1).cumsum(-1) <= 1.0 - top_p;
      remove.narrow(-1, remove.size(-1) - 1, 1).fill_(false);  // the most likely token stays
      scores = scores.masked_fill(remove.scatter(1, order, remove), drop);
    }
    return scores;
  }

  // one token per sequence, drawn from the softmax of the warped scores
  at::Tensor draw(const at::Tensor& logits, std::mt19937_64& generator) const {
    at::Tensor probs = warp(logits).softmax(-1).to(at::kDouble).contiguous();
    std::vector<int64_t> tokens;
    for (int64_t row = 0; row < probs.size(0); ++row) {
      const double* p = probs[row].data_ptr<double>();
      std::discrete_distribution<int64_t> pick(p, p + probs.size(1));
      tokens.push_back(pick(generator));
    }
    return torch::tensor(tokens, torch::kLong);
  }
};

struct Options {
  std::optional<Sampling> sampling;  // none: greedy
  std::optional<uint64_t> seed;
  std::string image;  // raw float32 file of the package's image input; empty: none
  std::vector<std::string> positional;
};

// Splits the sampling options from the positional arguments; refuses values out of range with the fix.
Options parse_options(int argc, char** argv) {
  Options options;
  Sampling sampling;
  bool sample = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      options.positional.push_back(arg);
      continue;
    }
    TORCH_CHECK(i + 1 < argc, arg, " needs a value");
    const std::string value = argv[++i];
    if (arg == "--image") {
      options.image = value;
      continue;
    }
    sample = true;
    if (arg == "--temperature") {
      sampling.temperature = std::stod(value);
      TORCH_CHECK(sampling.temperature > 0, "--temperature must be > 0, got ", value,
                  "; leave the sampling options out for greedy decoding");
    } else if (arg == "--top-k") {
      sampling.top_k = std::stoll(value);
      TORCH_CHECK(sampling.top_k >= 0, "--top-k must be >= 0, got ", value, "; 0 keeps every token, 1 is greedy");
    } else if (arg == "--top-p") {
      sampling.top_p = std::stod(value);
      TORCH_CHECK(sampling.top_p > 0 && sampling.top_p <= 1, "--top-p must be in (0, 1], got ", value,
                  "; 1 keeps every token");
    } else if (arg == "--seed") {
      options.seed = std::stoull(value);
    } else {
      TORCH_CHECK(false, "unknown option ", arg, " (--temperature, --top-k, --top-p, --seed, --image)");
    }
  }
  if (sample) options.sampling = sampling;
  return options;
}

// The image input from a raw float32 file of exactly the package's shape; undefined (after a message) otherwise.
at::Tensor read_image(const std::string& file, const ImageSpec& spec) {
  const int64_t count = c10::multiply_integers(spec.shape);
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  if (!in) {
    std::cerr << file << ": cannot read the image input\n";
    return {};
  }
  const auto bytes = static_cast<int64_t>(in.tellg());
  if (bytes != count * static_cast<int64_t>(sizeof(float))) {
    std::cerr << file << " holds " << bytes << " bytes; " << spec.name << " of shape " << c10::IntArrayRef(spec.shape)
              << " is " << count * sizeof(float) << " bytes of float32 (the shape the package was exported for)\n";
    return {};
  }
  at::Tensor values = torch::empty(spec.shape, torch::kFloat);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data_ptr<float>()), bytes);
  return values.to(spec.dtype);
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const c10::Error& error) {
    std::cerr << error.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::logic_error& error) {  // std::stod and friends: not a number
    std::cerr << "an option's value is not a number (" << error.what() << ")\n";
    return 2;
  }
  if (options.positional.size() < 3) {
    std::cerr << "usage: " << argv[0]
              << " [--temperature T] [--top-k K] [--top-p P] [--seed S] [--image FILE] model.pt2 "
                 "MAX_NEW_TOKENS ID [ID ...]\n";
    return 2;
  }
  const std::string path = options.positional[0];
  const int64_t max_new_tokens = std::stoll(options.positional[1]);
  std::vector<int64_t> prompt;
  for (size_t i = 2; i < options.positional.size(); ++i) prompt.push_back(std::stoll(options.positional[i]));
  std::mt19937_64 generator(options.seed ? *options.seed : std::random_device{}());

  Package package = read_package(path);
  const int64_t batch = package.sizes["batch"], length = static_cast<int64_t>(prompt.size());
  at::Tensor image;
  if (package.image) {
    if (options.image.empty()) {
      std::cerr << path << " takes " << package.image->name << " with every prompt: pass --image FILE\n";
      return 1;
    }
    image = read_image(options.image, *package.image);
    if (!image.defined()) return 1;
  } else if (!options.image.empty()) {
    std::cerr << path << " takes no image input; leave --image out\n";
    return 1;
  }
  if (length < package.sizes["min_prompt_len"] || length > package.sizes["max_prompt_len"]) {
    std::cerr << "the prompt has " << length << " tokens; the package takes " << package.sizes["min_prompt_len"]
              << " to " << package.sizes["max_prompt_len"] << "\n";
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader prefill(path, "prefill"), decode(path, "decode");
  // user_managed: both programs use these tensors themselves, one copy of the weights
  prefill.load_constants(package.weights["prefill"], false, true, true);
  decode.load_constants(package.weights["decode"], false, true, true);

  std::vector<at::Tensor> cache;
  for (const auto& spec : package.cache) {
    cache.push_back(torch::full(spec.shape, spec.fill, torch::TensorOptions().dtype(spec.dtype)));
  }
  at::Tensor ids = torch::tensor(prompt, torch::kLong).repeat({batch, 1});
  at::Tensor mask = torch::ones_like(ids);
  at::Tensor kept = torch::empty({0, std::min(length, package.sizes["kept_len_max"])});
  std::vector<at::Tensor> inputs = {ids, mask, kept};
  inputs.insert(inputs.end(), cache.begin(), cache.end());
  if (image.defined()) inputs.push_back(image);
  at::Tensor logits = prefill.run(inputs)[0];

  at::Tensor eos = torch::tensor(package.eos_token_ids, torch::kLong);
  at::Tensor unfinished = torch::ones({batch}, torch::kBool);
  at::Tensor position = torch::full({batch, 1}, length - 1, torch::kLong);
  std::vector<at::Tensor> generated;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    at::Tensor next = options.sampling ? options.sampling->draw(logits, generator) : logits.argmax(-1);
    if (eos.numel()) {
      next = torch::where(unfinished, next, package.sizes["pad_token_id"]);
      unfinished = unfinished & ~torch::isin(next, eos);
    }
    generated.push_back(next);
    if (step == max_new_tokens - 1 || (eos.numel() && !unfinished.any().item<bool>())) break;
    position = position + 1;
    std::vector<at::Tensor> step_inputs = {next.unsqueeze(1).contiguous(), position};
    step_inputs.insert(step_inputs.end(), cache.begin(), cache.end());
    logits = decode.run(step_inputs)[0];
  }
  at::Tensor tokens = torch::stack(generated, 1);
  for (int64_t row = 0; row < batch; ++row) {
    for (int64_t i = 0; i < tokens.size(1); ++i) std::cout << (i ? " " : "") << tokens[row][i].item<int64_t>();
    std::cout << "\n";
  }
  return 0;
}
