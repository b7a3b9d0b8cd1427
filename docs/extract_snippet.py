from speechlab.api import FeatureExtractor, load

model = load("microsoft/wavlm-base-plus")  # or a local speechlab / Hugging Face directory, or a unilm .pt
extractor = FeatureExtractor(
    model, layers=[6, 12], exact=True
)  # any layers 0..12; exact: batch == one by one
features = extractor(["data/ljspeech_en/audio/LJ001-0001.flac", "data/ljspeech_en/audio/LJ001-0004.flac"])
print(features.hidden_states.shape, features.lengths)  # (layers, utterances, frames, 768), valid frames
