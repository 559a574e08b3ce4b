"""Run by tests/test_clients.py in .venv-clients, where the labelling tools' own packages are
(and this project is not): each command reads what jobs/export.py wrote with a tool's own
code and prints what arrived as JSON, for the test to compare with the masks it exported.

  label-studio TASKS CONFIG OUT_DIR   label-studio-sdk's Converter: the tasks' predictions,
                                      accepted as a reviewer's annotations, to COCO (OUT_DIR/result.json)
  datumaro DIR                        Datumaro's coco_instances importer (CVAT's COCO 1.0 engine)
  datumaro-export OUT_DIR             a CVAT-style COCO 1.0 export of one polygon and one mask
  fiftyone IMAGES LABELS              FiftyOne's COCODetectionDataset importer (needs FIFTYONE_DATABASE_URI)
  hf-datasets GLOB                    Hugging Face datasets' Parquet loader: the rows' URIs
"""

import json
import sys


def label_studio(tasks: str, config: str, out_dir: str) -> dict:
    from label_studio_sdk.converter import Converter

    accepted = []
    for i, task in enumerate(json.load(open(tasks)), 1):
        annotation = {"id": i, "result": task["predictions"][0]["result"], "was_cancelled": False}
        accepted.append(dict(task, id=i, annotations=[annotation]))
    accepted_file = f"{out_dir}/accepted.json"
    json.dump(accepted, open(accepted_file, "w"))
    converter = Converter(config=open(config).read(), project_dir=None, download_resources=False)
    converter.convert_to_coco(accepted_file, out_dir, is_dir=False)
    coco = json.load(open(f"{out_dir}/result.json"))
    return {
        "images": len(coco["images"]),
        "annotations": coco["annotations"],
        "file_names": [i["file_name"] for i in coco["images"]],
    }


def datumaro(directory: str) -> dict:
    import datumaro as dm

    dataset = dm.Dataset.import_from(directory, "coco_instances")
    labels = dataset.categories()[dm.AnnotationType.label]
    items = {}
    for item in dataset:
        items[item.id] = [
            {"label": labels[a.label].name, "points": [float(v) for v in a.points]}
            for a in item.annotations
            if a.type == dm.AnnotationType.polygon
        ]
    return {"items": items}


def datumaro_export(out_dir: str) -> dict:
    import datumaro as dm
    import numpy as np

    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:50] = 1
    item = dm.DatasetItem(
        id="a/photo",
        media=dm.Image.from_numpy(np.zeros((40, 60, 3), np.uint8)),
        annotations=[
            dm.Polygon([2, 2, 12, 2, 12, 12, 2, 12], label=0, attributes={"occluded": False}),
            dm.Mask(mask, label=1, attributes={"occluded": False}),
        ],
    )
    categories = {dm.AnnotationType.label: dm.LabelCategories.from_iterable(["person", "dog"])}
    dataset = dm.Dataset.from_iterable([item], categories=categories)
    dataset.export(out_dir, "coco_instances", save_media=False, allow_attributes=True)
    return {"written": out_dir}


def fiftyone(images: str, labels: str) -> dict:
    import fiftyone as fo

    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=images,
        labels_path=labels,
        label_types=["segmentations"],
        label_field="segmentations",
    )
    samples = {}
    for sample in dataset:
        detections = sample["segmentations"].detections if sample["segmentations"] else []
        samples[sample.filepath.rsplit("/", 1)[-1]] = [
            {"label": d.label, "pixels": int(d.mask.sum()) if d.mask is not None else None} for d in detections
        ]
    dataset.delete()
    return {"samples": samples}


def hf_datasets(glob: str) -> dict:
    from datasets import load_dataset

    return {"uris": list(load_dataset("parquet", data_files=glob, split="train")["uri"])}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    run = {"label-studio": label_studio, "datumaro": datumaro, "datumaro-export": datumaro_export}
    run |= {"fiftyone": fiftyone, "hf-datasets": hf_datasets}
    print(json.dumps(run[command](*args)))
