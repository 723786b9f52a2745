"""`avatar distill` (`engine.training.student`): a few-step student regressed onto its teacher's reference latents."""

import json

import pytest
import torch

from engine.cli import main
from engine.config import from_preset
from engine.data.synthetic_dataset import write_synthetic_dataset
from engine.errors import CheckpointError, ConfigError
from engine.evaluation.held_out import dataset_frames, synthetic_frames
from engine.metrics import psnr, sharpness
from engine.model import Avatar
from engine.recipe import Recipe, TinyDecoderConfig
from engine.renderer import Renderer
from engine.sampling import FixedNoise, NoiseSchedule, make_sampler
from engine.sequence import orbit
from engine.training.decoder import recipe_latents
from engine.training.student import (
    StudentConfig,
    StudentModule,
    check_structure,
    check_teacher,
    compare,
    distill_student,
)

FAST = dict(teacher_recipe="ddim:3", frames=4, batch_size=2, lr=1e-3)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """A random-weight tiny avatar on the synthetic head (which poses the frames the targets are rendered for)."""
    config = from_preset("tiny").replace(head_model="synthetic", synthetic_version=1)
    return Avatar(config, seed=1).save_pretrained(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture
def teacher(teacher_folder):
    return Avatar.from_pretrained(teacher_folder)


def test_the_loss_falls_on_fixed_teacher_targets(teacher):
    frames = orbit(teacher.config, frames=3)[:2]
    with Renderer(teacher, sampler="ddim", steps=1, backend="reference") as r:
        condition, tokens = r.frame_inputs([f.camera for f in frames], torch.stack([torch.as_tensor(f.expression)
                                                                                   for f in frames]))
    target = recipe_latents(teacher, [_Frame(f, teacher) for f in frames], Recipe("ddim", 4), 2, "targets")
    student = teacher  # a fresh load of the teacher: trained in place
    student.requires_grad_(False)
    for net in (student.controlnet, student.unet):
        net.requires_grad_(True)
    sampler = make_sampler("ddim", NoiseSchedule(teacher.config.schedule), 1)
    shape = (teacher.config.vae.latent_channels, teacher.config.latent_size, teacher.config.latent_size)
    module = StudentModule(student, sampler, FixedNoise(shape, 1, teacher.config.noise_seed), 1.0).train()
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        loss = module(condition, tokens, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert student.vae.decoder.conv_in.weight.grad is None  # the decoder is frozen


class _Frame:
    """An orbit frame as recipe_latents reads it (camera, code, mesh)."""

    def __init__(self, frame, avatar):
        self.camera, self.code = frame.camera, torch.as_tensor(frame.expression, dtype=torch.float32)
        self.mesh = avatar.head_model.posed_mesh(self.code)


def test_resume_is_exact_and_the_student_renders_its_recipe(teacher, tmp_path):
    config = StudentConfig(steps=1, iterations=4, **FAST)
    whole = distill_student(teacher, tmp_path / "whole", config, held_out=0, checkpoint_every=2)
    part = distill_student(teacher, tmp_path / "part", config, held_out=0, max_minutes=0)
    assert not part["done"] and part["step"] == 1
    with pytest.raises(CheckpointError, match="pass --resume"):
        distill_student(teacher, tmp_path / "part", config, held_out=0)
    other = StudentConfig(steps=1, iterations=5, **FAST)
    with pytest.raises(CheckpointError, match="other settings"):
        distill_student(teacher, tmp_path / "part", other, held_out=0, resume=True)
    assert distill_student(teacher, tmp_path / "part", config, held_out=0, resume=True)["done"] and whole["done"]
    a, b = (Avatar.from_pretrained(tmp_path / name) for name in ("whole", "part"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.unet.conv_in.weight, teacher.unet.conv_in.weight)  # it trained
    assert torch.equal(a.vae.decoder.conv_in.weight, teacher.vae.decoder.conv_in.weight)  # the decoder did not
    assert str(a.config.recipe) == "ddim:1+vae"
    f = orbit(a.config, frames=3)[1]
    with Renderer(a) as own, Renderer(a, sampler="ddim", steps=1) as told:
        assert own.recipe.steps == 1 and (own.render(f.camera, f.expression) == told.render(f.camera,
                                                                                          f.expression)).all()
    assert json.loads((tmp_path / "whole" / "distilled.json").read_text())["settings"]["steps"] == 1


def test_bad_arguments(teacher, tmp_path, capsys):
    for bad in (dict(steps=3), dict(steps=2, teacher_recipe="ddim:2"), dict(iterations=0)):
        with pytest.raises(ConfigError):
            StudentConfig(**bad)
    with pytest.raises(SystemExit) as e:
        main(["distill", "--teacher", "tiny", "--steps", "3", "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    assert "invalid choice: 3" in capsys.readouterr().err
    (tmp_path / "not-an-avatar").mkdir()
    assert main(["distill", "--teacher", str(tmp_path / "not-an-avatar"), "--steps", "1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "avatar distill: error:" in capsys.readouterr().err and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="engine.model.Avatar"):
        check_teacher("a folder name")
    wrong = Avatar(from_preset("tiny"), seed=3)
    wrong.unet.conv_in = torch.nn.Conv2d(wrong.unet.conv_in.in_channels, 8, 3)
    with pytest.raises(ConfigError, match="does not match its teacher's structure"):
        check_structure(wrong, teacher)
    # a tiny decoder is trained apart from the denoiser: a student with another one, or none, still matches
    vae = teacher.config.vae
    blocks = (1,) * (vae.downsample.bit_length())  # one stage per resolution: log2(downsample) upsamplings
    other = Avatar(teacher.config.replace(tiny_decoder=TinyDecoderConfig(vae.latent_channels, 8, blocks)), seed=3)
    check_structure(other, teacher)
    other.unet.conv_in = torch.nn.Conv2d(other.unet.conv_in.in_channels, 8, 3)
    with pytest.raises(ConfigError, match=r"\(2 tensors differ, e.g. 'unet.conv_in.bias'\)"):
        check_structure(other, teacher)


def test_compare_scores_the_datasets_held_out_frames_against_the_reference(teacher, tmp_path):
    """With --data the held-out frames are the dataset's eval split (its truth carries the per-frame detail); a
    student that is its teacher scores exactly the teacher's DDIM-N, and the teacher's DDIM 1/2/4 are beside it."""
    write_synthetic_dataset(tmp_path / "d", sequences=2, frames_per_sequence=2, cameras=2,
                            size=teacher.config.image_size, eval_cameras=1, eval_sequences=1, progress=False,
                            detail=True)
    result = compare(teacher, teacher, StudentConfig(steps=1, **FAST), 3, data=tmp_path / "d")
    assert set(result["vs_reference_db"]) == {"teacher_ddim1", "teacher_ddim2", "teacher_ddim4", "student"}
    assert result["vs_reference_db"]["student"] == result["vs_reference_db"]["teacher_ddim1"]
    assert result["student_gain_over_teacher_db"] == 0 and result["frames"] == 3
    held = dataset_frames(tmp_path / "d", 3)[0]
    truth, masks = torch.stack([f.image for f in held]), torch.stack([f.mask for f in held])
    assert result["sharpness"]["truth"] == pytest.approx(float(sharpness(truth, masks).mean()), abs=1e-6)
    with torch.no_grad():  # the autoencoder row: the teacher's VAE on the dataset's truth, computed here directly
        z = teacher.vae.encode(truth * 2 - 1).latent_dist.mean
        again = (teacher.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert result["vs_truth_db"]["autoencoder"] == pytest.approx(float(psnr(again, truth).mean()), abs=1e-3)


def test_a_reference_with_the_tiny_decoder_is_decoded_by_it_everywhere(teacher, tmp_path):
    """`--teacher-recipe ...+tiny`: the reference, the few-step rows, the autoencoder row and the student's recipe
    all use the teacher's tiny decoder. Its last conv zeroed with bias 0.25 outputs 2 * 0.25 - 1 everywhere
    (DecoderTiny maps [0, 1] to [-1, 1]): a flat 0.25 image, whose Laplacian is 0 and whose PSNR against the truth
    is computed here."""
    config = StudentConfig(steps=1, iterations=2, **{**FAST, "teacher_recipe": "ddim:3+tiny"})
    assert config.decoder == "tiny" and StudentConfig(steps=1, **FAST).decoder == "vae"
    with pytest.raises(ConfigError, match="has no tiny decoder"):
        distill_student(teacher, tmp_path / "none", config, held_out=0)
    assert not (tmp_path / "none").exists()
    vae = teacher.config.vae
    shape = TinyDecoderConfig(vae.latent_channels, 8, (1,) * vae.downsample.bit_length())
    tiny = Avatar(teacher.config.replace(tiny_decoder=shape), seed=1)
    last = tiny.tiny_decoder.layers[-1]
    with torch.no_grad():
        last.weight.zero_(), last.bias.fill_(0.25)
    result = compare(tiny, tiny, config, 2)
    assert result["decoder"] == "tiny"
    assert all(result["sharpness"][k] == 0 for k in ("reference", "teacher_ddim1", "student", "autoencoder"))
    held = synthetic_frames(tiny, 2)[0]
    truth = torch.stack([f.image for f in held])
    flat = psnr(torch.full_like(truth, 0.25), truth).mean()
    assert result["vs_truth_db"]["reference"] == pytest.approx(float(flat), abs=1e-3)
    assert distill_student(tiny, tmp_path / "s", config, held_out=0)["done"]
    assert str(Avatar.from_pretrained(tmp_path / "s").config.recipe) == "ddim:1+tiny"


def test_the_shipped_demo_student_is_closer_to_the_demos_reference_than_its_ddim1():
    """engine/avatars/demo-student (`avatar distill --teacher demo --steps 1`, stored in float16): the demo's
    structure, its own recipe DDIM 1, and on held-out frames closer to the demo's DDPM-20 frames (its reference)
    than the demo's DDIM 1, without losing ground truth (issue 17's bar for the demo)."""
    from engine.avatars import load_avatar
    from engine.recipe import parse_recipe

    demo, student = load_avatar("demo"), load_avatar("demo-student")
    check_structure(student, demo)
    assert student.config.default_recipe == Recipe("ddim", 1, "vae")
    held = synthetic_frames(demo, 3)[0]
    truth = torch.stack([f.image for f in held])

    def images(avatar, recipe):
        with torch.no_grad():
            return (avatar.decode(recipe_latents(avatar, held, parse_recipe(recipe), 3, recipe)) / 2 + 0.5).clamp(0, 1)

    reference, ddim1, distilled = images(demo, "ddpm:20"), images(demo, "ddim:1"), images(student, "ddim:1")
    assert psnr(distilled, reference).mean() > psnr(ddim1, reference).mean() + 3
    assert psnr(distilled, truth).mean() >= psnr(ddim1, truth).mean()


def test_the_distill_report_takes_the_teachers_row_of_the_students_reference_recipe(tmp_path):
    """A `+tiny` reference: the teacher's gain and flicker come from its ddpm:20+tiny row, not its ddpm:20+vae one
    (bar figures by hand: 1.8 / 2.0 = 0.9 gain, 1.2 / 1.0 = 1.2 flicker)."""
    from benchmarks.distill_report import main as report

    rows = [{"recipe": "ddpm:20+vae", "gain": 4.0, "flicker_ratio": 3.0, "psnr": 25.0, "psnr_mask": 22.0},
            {"recipe": "ddpm:20+tiny", "gain": 2.0, "flicker_ratio": 1.0, "psnr": 26.0, "psnr_mask": 23.0}]
    (tmp_path / "recipes.json").write_text(json.dumps({"avatar": "t", "data": "d", "recipes": rows}))
    held = {"frames": 2, "sharpness": {"reference": 0.5, "autoencoder": 0.8, "truth": 1.0, "student": 0.45,
                                       "teacher_ddim1": 0.4, "teacher_ddim2": 0.4, "teacher_ddim4": 0.4},
            "vs_reference_db": {"student": 30.0, "teacher_ddim1": 20.0, "teacher_ddim2": 21.0, "teacher_ddim4": 22.0},
            "vs_truth_db": {k: 20.0 for k in ("reference", "student", "autoencoder", "teacher_ddim1", "teacher_ddim2",
                                              "teacher_ddim4")},
            "student_gain_over_teacher_db": 10.0}
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "distilled.json").write_text(json.dumps({"settings": {"teacher_recipe": "ddpm:20+tiny"},
                                                                 "held_out": held}))
    (tmp_path / "eval.json").write_text(json.dumps({"psnr": 20.0, "psnr_mask": 18.0, "neutral": {"gain": 1.8},
                                                    "flicker": {"ratio": 1.2}}))
    report(["--recipes", str(tmp_path / "recipes.json"), "--student", f"1={tmp_path / 's1'},{tmp_path / 'eval.json'}",
            "--out", str(tmp_path / "r")])
    bars = json.loads((tmp_path / "r.json").read_text())["bars"]
    assert bars["student1_expression_gain_vs_teacher"] == pytest.approx(0.9)
    assert bars["student1_flicker_vs_teacher"] == pytest.approx(1.2)
    assert bars["reference_sharpness_vs_truth"] == pytest.approx(0.5)
