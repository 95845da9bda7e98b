package data

import (
	"errors"
	"fmt"

	"peft/peft/chat"
)

// Tokenizer is what tokenizing needs of *tokenizer.Tokenizer.
type Tokenizer interface {
	// Encode tokenizes text with the post-processor's special tokens (Llama's <s>).
	Encode(text string) []int
	// EncodeNoSpecial tokenizes text as it is.
	EncodeNoSpecial(text string) []int
}

// Options say how records become examples.
type Options struct {
	// SeqLen is the length of a row, in tokens. Required.
	SeqLen int
	// EOS is the id appended to each text and completion, so that the model learns to stop
	// (the model's eos_token_id); -1 appends nothing.
	EOS int
	// Template formats Chat records; required for them.
	Template *chat.Template
}

// Example is one tokenized record (or one window of a long text).
type Example struct {
	// Line is the record's line in its file.
	Line int
	// IDs are the tokens.
	IDs []int32
	// Loss marks the tokens the model learns to predict (each from the tokens before it).
	Loss []bool
}

// Stats counts what tokenizing did, so that nothing changes unseen.
type Stats struct {
	// Records read and Examples made (a long text makes several).
	Records, Examples int
	// Tokens in all examples, and LossTokens among them.
	Tokens, LossTokens int
	// Truncated counts prompt/completion and chat examples cut at SeqLen (their end is lost);
	// Split counts texts cut into several windows of SeqLen (nothing is lost).
	Truncated, Split int
	// FirstTruncated is the line of the first truncated record (0 if none).
	FirstTruncated int
	// TurnSplit counts chat records made into one example per assistant turn, as a template
	// that rewrites earlier turns needs (Qwen3's).
	TurnSplit int
	// Merged counts prompt/completion records whose prompt's last token merges with the
	// completion's first when tokenized together (end the prompt with a space or newline, or
	// start the completion with one, to keep them apart).
	Merged int
}

// String reports the counts on one line.
func (s Stats) String() string {
	out := fmt.Sprintf("%d records → %d examples, %d tokens (%d in the loss)", s.Records, s.Examples, s.Tokens, s.LossTokens)
	if s.Split > 0 {
		out += fmt.Sprintf(", %d long texts split", s.Split)
	}
	if s.Merged > 0 {
		out += fmt.Sprintf(", %d prompts whose last token merges into the completion", s.Merged)
	}
	if s.TurnSplit > 0 {
		out += fmt.Sprintf(", %d conversations made into one example per assistant turn (the chat template rewrites earlier turns)", s.TurnSplit)
	}
	if s.Truncated > 0 {
		out += fmt.Sprintf(", %d examples truncated at the row length (first: line %d)", s.Truncated, s.FirstTruncated)
	}
	return out
}

// Tokenize turns the file's records into examples of at most opts.SeqLen tokens:
//   - Text: Encode(text) and EOS, all in the loss; a text longer than SeqLen is split into
//     windows of SeqLen (Stats.Split), each learnt from its own start (a last token alone keeps
//     the one before it as context).
//   - PromptCompletion: Encode(prompt + completion) and EOS, tokenized together as the model will
//     read them when it continues the prompt (as TRL does), the loss on the tokens after those
//     the prompt alone tokenizes to: the completion and EOS. Where the prompt's last token
//     merges with the completion's first, the merged token is learnt too (Stats.Merged).
//   - Chat: opts.Template's rendering, tokenized as the template writes it (chat.Rendered.Encode),
//     the loss on the assistant turns and their end-of-turn tokens. With a template that
//     rewrites earlier turns (Qwen3's), a conversation becomes one example per assistant turn,
//     the conversation up to it as context (Stats.TurnSplit).
//
// A prompt/completion or chat example longer than SeqLen keeps its first SeqLen tokens
// (Stats.Truncated); one left with nothing in the loss is an error naming its line.
func Tokenize(f *File, tok Tokenizer, opts Options) ([]Example, Stats, error) {
	if opts.SeqLen < 2 {
		return nil, Stats{}, fmt.Errorf("data.Tokenize: SeqLen must be ≥ 2, got %d", opts.SeqLen)
	}
	if f.Format == Chat && opts.Template == nil {
		return nil, Stats{}, fmt.Errorf("data: %s holds chat records and the model has no chat template: give one (tokenizer_config.json's chat_template), or use text or prompt/completion records", f.Name)
	}
	stats := Stats{Records: len(f.Records)}
	var out []Example
	eos := func(ids []int) []int {
		if opts.EOS >= 0 {
			ids = append(ids, opts.EOS)
		}
		return ids
	}
	for _, rec := range f.Records {
		var ids []int
		var loss []bool
		switch f.Format {
		case Text:
			ids = eos(tok.Encode(rec.Text))
			loss = repeat(true, len(ids))
			if len(ids) > opts.SeqLen {
				stats.Split++
				for start := 0; start < len(ids); start += opts.SeqLen {
					end := min(start+opts.SeqLen, len(ids))
					from := start
					if end-start < 2 {
						from-- // a last token alone has nothing to predict it from: keep the one before as context
					}
					out = append(out, example(rec.Line, ids[from:end], loss[from:end]))
				}
				continue
			}
		case PromptCompletion:
			prompt := tok.Encode(rec.Prompt)
			ids = eos(tok.Encode(rec.Prompt + rec.Completion))
			shared := 0
			for shared < min(len(prompt), len(ids)) && prompt[shared] == ids[shared] {
				shared++
			}
			if shared < len(prompt) {
				stats.Merged++
			}
			loss = append(repeat(false, shared), repeat(true, len(ids)-shared)...)
		case Chat:
			rendered, err := chatExamples(opts.Template, rec.Messages)
			if err != nil {
				return nil, Stats{}, fmt.Errorf("data: %s:%d: %w", f.Name, rec.Line, err)
			}
			if len(rendered) > 1 {
				stats.TurnSplit++
			}
			for k, r := range rendered {
				toks, err := r.Encode(tok)
				if err != nil {
					return nil, Stats{}, fmt.Errorf("data: %s:%d: %w", f.Name, rec.Line, err)
				}
				if k == len(rendered)-1 {
					ids, loss = toks.IDs, toks.Mask() // the last goes through the common path below
					break
				}
				ex, err := fit(f, rec.Line, toks.IDs, toks.Mask(), opts.SeqLen, &stats)
				if err != nil {
					return nil, Stats{}, err
				}
				out = append(out, ex)
			}
		default:
			return nil, Stats{}, fmt.Errorf("data: %s: unknown format %q", f.Name, f.Format)
		}
		ex, err := fit(f, rec.Line, ids, loss, opts.SeqLen, &stats)
		if err != nil {
			return nil, Stats{}, err
		}
		out = append(out, ex)
	}
	if len(out) == 0 {
		return nil, Stats{}, errors.New("data: no examples")
	}
	for _, ex := range out {
		stats.Tokens += len(ex.IDs)
		stats.LossTokens += countTargets(ex)
	}
	stats.Examples = len(out)
	return out, stats, nil
}

// fit makes the example of a prompt/completion or chat record, truncated to seqLen (counted in
// stats); one left with nothing to learn is an error naming its line.
func fit(f *File, line int, ids []int, loss []bool, seqLen int, stats *Stats) (Example, error) {
	if len(ids) > seqLen {
		if stats.Truncated == 0 {
			stats.FirstTruncated = line
		}
		stats.Truncated++
		ids, loss = ids[:seqLen], loss[:seqLen]
	}
	ex := example(line, ids, loss)
	if countTargets(ex) == 0 {
		return Example{}, fmt.Errorf("data: %s:%d: no token left to learn within the row length %d (the prompt fills it): raise the sequence length or shorten the prompt", f.Name, line, seqLen)
	}
	return ex, nil
}

// chatExamples renders a conversation as one example, or, with a template that rewrites earlier
// turns (Qwen3's), as one example per assistant turn, each ending with its turn.
func chatExamples(tmpl *chat.Template, msgs []chat.Message) ([]chat.Rendered, error) {
	r, err := tmpl.RenderSpans(msgs, chat.Options{})
	if err == nil {
		return []chat.Rendered{r}, nil
	}
	if !errors.Is(err, chat.ErrRewritesTurns) {
		return nil, err
	}
	var out []chat.Rendered
	for i, m := range msgs {
		if m.Role != "assistant" {
			continue
		}
		r, err := tmpl.RenderLastTurn(msgs[:i+1], chat.Options{})
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// example copies ids and loss into an Example; the first token is never a target (nothing
// precedes it).
func example(line int, ids []int, loss []bool) Example {
	ex := Example{Line: line, IDs: make([]int32, len(ids)), Loss: append([]bool(nil), loss...)}
	for i, id := range ids {
		ex.IDs[i] = int32(id)
	}
	if len(ex.Loss) > 0 {
		ex.Loss[0] = false
	}
	return ex
}

// countTargets counts the tokens in the loss.
func countTargets(ex Example) int {
	n := 0
	for _, l := range ex.Loss {
		if l {
			n++
		}
	}
	return n
}

func repeat(v bool, n int) []bool {
	out := make([]bool, n)
	for i := range out {
		out[i] = v
	}
	return out
}
